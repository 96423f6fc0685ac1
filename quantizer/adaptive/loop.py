"""The measurement pass of adaptive GPTQ: per layer and module group, the output error and exact
storage cost of every candidate setting (measurement.json, measurements/store.py), on the float
layers' inputs. The measurement depends on the model, the calibration set and the GPTQ
settings, never on the bits target, so one file serves any number of targets."""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from ..measurements.fingerprint import job_fingerprint
from ..methods.measure import measure_layer, store_groups
from ..methods.residual_share import residual_shares
from ..run.layer_loop import LayerLoop
from ..run.report import LayerRecord
from ..stream.hidden_store import Chunks
from ..stream.skeleton import load_layer, release_layer

STAGE = "measure"
MEASURE_NAME = "measurement.json"
log = logging.getLogger(__name__)


def measure_settings(settings) -> dict:
    """The settings a measurement depends on (the bits target is deliberately absent)."""
    opts = settings.gptq
    out = {"symmetric": settings.symmetric, "calib": settings.to_dict()["calib"],
           "damp": opts.damp, "act_order": bool(opts.act_order),
           "static_groups": bool(opts.static_groups), "dtype": settings.dtype}
    # recorded only when not the original behaviour, so older measurements stay valid
    for key, value, plain in (("scale_search", settings.rounding.search, "minmax"),
                              ("token_weights", settings.rounding.weights, "none")):
        if value != plain:
            out[key] = value
    return out


def measurement_fingerprint(model_fp: str, calib_fp: str, settings) -> dict:
    """What a measurement.json must match to be reused: one definition for `quantize measure`
    and for the measurement a quantize run makes or loads."""
    return job_fingerprint(model_fp, calib_fp, measure_settings(settings))


class MeasureLoop(LayerLoop):
    """The measurement pass: float layers throughout (every candidate is judged on the same
    inputs), one measurement.json entry per layer, resumable like the quantize pass."""

    def __init__(self, job, store, jobdir, tokens, progress):
        super().__init__(job, None, None, jobdir, tokens, progress)
        self.store = store
        self.measured = 0  # layers measured by this process (tests assert reuse with it)
        self.seconds: list[float] = []  # wall time of each layer measured by this process
        self.stats: list[dict] = []  # each measured layer's measure_* timings and counts

    @torch.no_grad()
    def run(self) -> list[LayerRecord]:
        """Measure every layer not measured yet; no layer is quantized (no records)."""
        n = self.job.source.num_layers
        start = self.jobdir.next_layer(STAGE)
        self.store.check_progress(start)
        if start:
            self._restore_float_inputs(start)
        bar = tqdm(total=n, initial=start, desc="measure", unit="layer",
                   disable=not self.progress)
        for i in range(start, n):
            self._measure(i)
            bar.update(1)
        bar.close()
        return []

    def _measure(self, i: int) -> None:
        job = self.job
        t0 = time.perf_counter()
        layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                           job.padded_intermediate)
        # MoE layers: every expert's groups are measured, so bits are allocated per expert
        ctx = job.layer_context(i, layer, self.model.config, self.inputs, self.layer_kwargs(i),
                                arch=job.arch.for_layer(self.model.config, i))
        results = measure_layer(ctx, options=job.settings.gptq, rounding=job.settings.rounding)
        with residual_shares(ctx) as shares:  # for --error-weights residual, same forward
            self.inputs = ctx.outputs()
        if not shares:
            log.info("measure: layer %d is not h + block(h) in form: no residual shares "
                     "(--error-weights residual will weigh every group 1)", i)
        release_layer(self.model, i)
        self.store.record_layer(i, store_groups(ctx, results), blocks=shares)
        if self.save_hidden and i + 1 < job.source.num_layers:
            self.jobdir.save_hidden(i + 1, self.inputs)
        self.jobdir.commit_layer(STAGE, i, has_file=False)
        self.measured += 1
        self.seconds.append(time.perf_counter() - t0)
        self.stats.append({k: v for k, v in ctx.stats.items() if k.startswith("measure_")})

    def _restore_float_inputs(self, start: int) -> None:
        if self.jobdir.has_hidden(start, STAGE):
            self.inputs = Chunks([t.to(self.hidden_dev)
                                  for t in self.jobdir.load_hidden(start, STAGE)],
                                 where="gpu" if self.hidden_dev.type == "cuda" else "cpu")
            return
        job = self.job
        for i in range(start):  # the measurement propagates float layers: replay them
            layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                               job.padded_intermediate)
            ctx = job.layer_context(i, layer, self.model.config, self.inputs,
                                    self.layer_kwargs(i))
            self.inputs = ctx.outputs()
            release_layer(self.model, i)
