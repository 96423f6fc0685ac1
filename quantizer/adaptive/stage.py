"""Adaptive GPTQ in a run: check a reused --measurement before any work, then (the run's
"measure" stage) measure or reuse, and allocate bits per module; and `quantize measure`, the
measurement pass alone into a file."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace

from ..errors import InputError
from ..measurements.atomic import atomic_write_bytes
from ..measurements.fingerprint import fingerprint_calibration, fingerprint_model
from ..measurements.jobstate import JobDir
from ..measurements.store import MeasurementStore
from ..parallel.distributed import world
from ..run.calibrate import calibration_tokens
from ..run.job import plan_job, prepare_skeleton
from ..run.jobdir import discard_refused_job
from ..run.outputs import RefusedLate, check_measurement_output, check_paths
from ..run.serving_checks import check_planned
from ..run.widths import linear_shapes
from .allocation import BpwRange, bpw_range, check_target, choose_settings
from .loop import MEASURE_NAME, STAGE, MeasureLoop, measure_settings, measurement_fingerprint

log = logging.getLogger(__name__)


def check_measurement(job, fingerprint: dict) -> None:
    """--measurement FILE, before any job directory exists: made for this model, calibration
    and GPTQ options, and able to reach the --bits target."""
    s = job.settings
    store = load_measurement(s.measurement, fingerprint)
    if not store.is_complete(job.source.num_layers):
        raise InputError(f"measurement {store.path} covers {store.layers_done()} of "
                         f"{job.source.num_layers} layers: finish it with quantize measure "
                         f"--resume")
    check_target(target_range(job, store), float(s.bits), store.path)


def target_range(job, store) -> BpwRange:
    s = job.settings
    return bpw_range(store, s.symmetric, linear_shapes(job.source, job.padded_intermediate),
                     linear_shapes(job.source, None), s.engine)


def load_measurement(path, fingerprint: dict) -> MeasurementStore:
    store = MeasurementStore.load(path)
    store.check_fingerprint(fingerprint)
    return store


def allocate_bits(job, jobdir, tokens, measure_fp, progress: bool, extra: dict
                  ) -> dict[str, tuple[int, int]]:
    """Measure (or reuse a measurement), then allocate bits: {module: (bits, group_size)};
    what it measured and chose goes into `extra` (the run's report)."""
    s = job.settings
    if s.measurement:
        store = load_measurement(s.measurement, measure_fp)
        log.info("reusing measurement %s (no measuring pass)", s.measurement)
    else:
        store = MeasurementStore.open(jobdir.path / MEASURE_NAME, measure_fp)
        if jobdir.stage == STAGE:
            loop = MeasureLoop(job, store, jobdir, tokens, progress)
            loop.run()
            extra.update(layers_measured=loop.measured, measure_seconds=loop.seconds,
                         measure_stats=loop.stats)
            jobdir.set_stage("quantize")
    if not store.is_complete(job.source.num_layers):
        raise InputError(f"measurement {store.path} covers {store.layers_done()} of "
                         f"{job.source.num_layers} layers")
    extra["measurement"] = str(store.path)
    try:
        settings, extra["bit_allocation"] = choose_settings(
            store, job.arch, float(s.bits), s.symmetric,
            linear_shapes(job.source, job.padded_intermediate), s.gptq.error_weights,
            linear_shapes(job.source, None), s.engine)
        job.notes += [f"serving {w}" for w in check_planned(job, settings)]
    except InputError as e:
        if s.measurement:
            raise
        # measured by this run (hours, on a big model): a target it cannot serve keeps it
        raise RefusedLate(f"{e}; this run's measurement is kept in {store.path}: copy it "
                          f"out and rerun with --measurement FILE --overwrite") from None
    return settings


def run_measure(model_path, settings, out, progress: bool = True) -> dict:
    """`quantize measure`: the measurement pass alone, into the file out.output (out:
    settings.OutputSettings). Resumable like a quantize job (OUTPUT.job holds the layers
    measured so far); the file serves any number of later `--measurement` runs with the same
    model, calibration and GPTQ options."""
    if world().distributed:
        raise InputError("quantize measure runs in one process (no --devices / torchrun)")
    t0 = time.perf_counter()
    settings = replace(settings, method="gptq", adaptive=True).validated()
    out = out.validated()
    check_paths(model_path, out.output, out.work, what="measurement file")
    jobdir = JobDir(out.work)
    check_measurement_output(out.output, out.overwrite, out.resume, jobdir.peek() is not None)
    job = plan_job(model_path, settings)
    prepare_skeleton(job)
    tokens = calibration_tokens(job)
    assert tokens is not None  # a measurement runs GPTQ, which calibrates
    fingerprint = measurement_fingerprint(fingerprint_model(job.source.path),
                                          fingerprint_calibration(tokens), job.settings)
    created = not out.work.exists()
    jobdir.begin(fingerprint, resume=out.resume, overwrite=out.overwrite, first_stage=STAGE)
    for n in job.notes:  # after the last refusal: a refused run says one line only
        log.info("%s", n)
    try:
        loop = _measure_into(job, jobdir, tokens, fingerprint, out.output, progress)
    except InputError as e:
        discard_refused_job(jobdir, created, e)
        raise
    finally:
        jobdir.unlock()
    shutil.rmtree(out.work, ignore_errors=True)
    return {"model": str(model_path), "measurement": str(out.output),
            "layers": job.source.num_layers, "layers_measured": loop.measured,
            "measure_seconds": loop.seconds, "measure_stats": loop.stats,
            "settings": measure_settings(job.settings), "notes": job.notes,
            "seconds": time.perf_counter() - t0}


def _measure_into(job, jobdir, tokens, fingerprint, output, progress) -> MeasureLoop:
    store = MeasurementStore.open(jobdir.path / MEASURE_NAME, fingerprint)
    loop = MeasureLoop(job, store, jobdir, tokens, progress)
    loop.run()
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, (jobdir.path / MEASURE_NAME).read_bytes())
    jobdir.finish()
    return loop
