"""`quantize`, one job: prepare (every refusal, before anything is written), then the stages in
order over one JobState, each skipping what the job directory says is done:

    measure   (adaptive only) measure every candidate, or reuse --measurement; allocate bits
    quantize  the layer loop: read -> calibrate -> quantize -> write -> propagate, per layer
    export    assemble the export inside the job directory and check vLLM's rules on it
    done      publish it under OUTPUT (a rename), then the job directory goes

The stage names are the job directory's (measurements/jobstate.py STAGES): a resumed run starts
where state.json says, and whether a job is complete is decided by its directory alone (stage
"done" and no staged export left in it)."""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adaptive.loop import measurement_fingerprint
from ..adaptive.stage import allocate_bits, check_measurement
from ..errors import InputError
from ..export import get_exporter
from ..export.serving import NotServable
from ..export.writer import publish
from ..measurements.fingerprint import (fingerprint_calibration, fingerprint_model,
                                        job_fingerprint)
from ..measurements.jobstate import STAGES, JobDir
from ..methods.registry import method_for
from ..parallel.distributed import World, world
from ..plan.memory import CUDA_CONTEXT
from ..settings import OutputSettings, QuantSettings
from .assemble import assemble
from .calibrate import calibration_tokens
from .job import Job, plan_job, prepare_skeleton
from .jobdir import FollowerJob, begin_job, check_output, discard_refused_job
from .layer_loop import LayerLoop
from .outputs import check_paths, input_files
from .report import QuantResult
from .serving_checks import check_staged

log = logging.getLogger(__name__)
STAGED = "final"  # the export being assembled, inside the job directory


@dataclass
class JobState:
    """One job as its stages see it."""

    job: Job
    out: OutputSettings
    jobdir: JobDir | FollowerJob  # FollowerJob: the read-only view of ranks > 0
    tokens: torch.Tensor | None
    world: World
    progress: bool
    created: bool  # this run made the job directory (a refusal removes it again)
    measure_fp: dict | None = None
    module_settings: dict | None = None  # adaptive: {module: (bits, group size)}
    records: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # fixed costs beside the layers, seconds

    @property
    def staged(self) -> Path:
        return self.out.work / STAGED

    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0


def run_quantize(model_path, settings: QuantSettings, out: OutputSettings,
                 progress: bool = True) -> QuantResult:
    """Plan, then run the resumable job: quantize every layer into the job directory, then
    assemble the export and publish it under out.output only when complete.

    Everything is checked before anything is written: settings, paths (the output is never
    the input, inside it or around it), the model, the measurement, an existing output (only
    our own export is ever replaced); a refusal leaves nothing on disk."""
    t_start = time.perf_counter()
    st = prepare(model_path, settings, out, progress)
    with _job_kept_on_failure(st):
        for stage in STAGES:
            STAGE_RUNS[stage](st)
        st.world.barrier()  # every rank is done with the job directory before it goes
    st.jobdir.unlock()
    if st.world.main:
        shutil.rmtree(st.out.work, ignore_errors=True)
    st.extra["phases_s"] = st.phases
    job = st.job
    return QuantResult(model=str(model_path), output=str(st.out.output),
                       settings=job.settings.to_dict(), group_size=job.group_size,
                       export_format=job.export_format, notes=job.notes, layers=st.records,
                       seconds=time.perf_counter() - t_start, extra=st.extra)


# ---- before anything is written -----------------------------------------------------------
def prepare(model_path, settings: QuantSettings, out: OutputSettings, progress: bool
            ) -> JobState:
    """Every check, the plan, the skeleton and the calibration tokens; then the job directory
    begins (or resumes). A refusal here leaves nothing on disk."""
    w = world()
    t0 = time.perf_counter()
    settings, out = settings.validated(), out.validated()
    check_paths(model_path, out.output, out.work, inputs=input_files(settings))
    job = plan_job(model_path, settings, out.max_shard_bytes, w)
    phases = {"plan": time.perf_counter() - t0}
    t0 = time.perf_counter()
    prepare_skeleton(job)
    phases["skeleton"] = time.perf_counter() - t0  # meta model, embeddings, shape check
    t0 = time.perf_counter()
    tokens = calibration_tokens(job)
    phases["calibration_tokens"] = time.perf_counter() - t0
    fingerprint = job_fingerprint(fingerprint_model(job.source.path),
                                  fingerprint_calibration(tokens) if tokens is not None else None,
                                  job.settings.result_dict())
    measure_fp = None
    if job.settings.is_adaptive:
        measure_fp = measurement_fingerprint(fingerprint["model"], fingerprint["calibration"],
                                             job.settings)
        if job.settings.measurement:
            check_measurement(job, measure_fp)
    check_output(out.output, out.work, out.overwrite, out.resume)
    created = not out.work.exists()
    first = "measure" if job.settings.is_adaptive and not job.settings.measurement else "quantize"
    # rank 0 alone owns (locks and writes) the job directory; other ranks read it
    jobdir = begin_job(w, JobDir(out.work), fingerprint, resume=out.resume,
                       overwrite=out.overwrite, first_stage=first)
    st = JobState(job, out, jobdir, tokens, w, progress, created, measure_fp, phases=phases,
                  extra=_report_extra(job, w))
    for n in job.notes:  # after the last refusal: a refused run says one line only
        log.info("%s", n)
    if out.overwrite and w.main:  # a later --resume of this job may replace the old export too
        jobdir.set_note("replaces_output", True)
    return st


def _report_extra(job: Job, w: World) -> dict:
    """What the report holds beside the layers: processes, the memory plan."""
    extra: dict = {"processes": w.size} if w.distributed else {}
    if job.plan is not None:
        extra["plan"] = {"predicted_peak": {dp.device.label: dp.predicted_peak
                                            for dp in job.plan.devices},
                         "ram_peak": job.plan.ram_peak,
                         # the part of a predicted peak torch's allocator never sees
                         "cuda_context": CUDA_CONTEXT,
                         "decisions": {dp.device.label: dict(vars(dp.decisions))
                                       for dp in job.plan.devices},
                         "text": job.plan.format()}
    return extra


@contextmanager
def _job_kept_on_failure(st: JobState):
    """A failing stage unlocks the job directory and keeps it for --resume, except after bad
    input that a rerun cannot reuse (discard_refused_job)."""
    try:
        yield
    except NotServable as e:
        # Every layer is done: keep the job directory, so a fixed exporter re-exports it
        # (--resume) without quantizing again.
        st.jobdir.unlock()
        raise NotServable(f"{e}\njob directory kept: {st.out.work} (rerun with --resume "
                          f"once fixed)") from None
    except InputError as e:
        if st.world.main:
            discard_refused_job(st.jobdir, st.created, e)
        st.jobdir.unlock()
        raise
    except BaseException:
        st.jobdir.unlock()  # the job directory stays: rerun with --resume
        raise


# ---- the stages ---------------------------------------------------------------------------
def measure_stage(st: JobState) -> None:
    """Adaptive runs: measure (or reuse a measurement) and allocate bits per module; needed
    by every later stage, so it is redone from the measurement on a resume."""
    if st.job.settings.is_adaptive and not _complete(st):
        st.module_settings = allocate_bits(st.job, st.jobdir, st.tokens, st.measure_fp,
                                           st.progress, st.extra)


def quantize_stage(st: JobState) -> None:
    """The layer loop, from the first layer the job directory has not finished."""
    if st.jobdir.stage != "quantize":
        st.records = LayerLoop.records(st.jobdir)
        return
    s = st.job.settings
    method = method_for(s, **(
        {"module_settings": st.module_settings} if st.module_settings is not None else {}))
    with st.timed("embed"):  # layer-0 inputs (a skeleton after measuring)
        loop = LayerLoop(st.job, method, get_exporter(st.job.export_format), st.jobdir,
                         st.tokens, st.progress)
    st.records = loop.run()
    st.jobdir.set_stage("export")


def export_stage(st: JobState) -> None:
    """Rank 0: the export assembled in the job directory and vLLM's rules checked on it
    (NotServable keeps the job for --resume); then the job directory says "done"."""
    if st.jobdir.stage != "export":
        return
    if st.world.main:
        with st.timed("export"):
            assemble(st.job, st.jobdir, st.staged, st.out.max_shard_bytes, st.module_settings)
            st.extra["serving"] = check_staged(st.job, st.staged)
    st.jobdir.set_stage("done")


def publish_stage(st: JobState) -> None:
    """Rank 0: the staged export renamed to OUTPUT (a job "done" without one has published)."""
    if not st.world.main:
        return
    if _complete(st):
        log.info("job already complete: %s", st.out.output)
        return
    with st.timed("export"):
        publish(st.staged, st.out.output)


def _complete(st: JobState) -> bool:
    return st.jobdir.stage == "done" and not st.staged.exists()


STAGE_RUNS = {"measure": measure_stage, "quantize": quantize_stage, "export": export_stage,
              "done": publish_stage}
assert tuple(STAGE_RUNS) == STAGES, "one stage function per job-directory stage, in order"
