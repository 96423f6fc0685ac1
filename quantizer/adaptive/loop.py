"""Adaptive GPTQ: a measurement pass records, per layer and module group, the output error and
exact storage cost of candidate settings (measurement.json); the optimiser picks one candidate
per group to meet an average bits-per-weight target; GPTQ then quantizes with those settings.

The measurement depends on the model, the calibration set and the GPTQ settings, never on the
target, so one file serves any number of targets."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..methods.context import LayerContext
from ..run.layer_loop import LayerLoop
from ..run.report import LayerRecord
from ..stream.skeleton import load_layer, release_layer

STAGE = "measure"
MEASURE_NAME = "measurement.json"


def measure_settings(settings) -> dict:
    """The settings a measurement depends on (the bits target is deliberately absent)."""
    opts = settings.method_options
    out = {"symmetric": settings.symmetric, "calib": settings.to_dict()["calib"],
           "damp": opts.get("damp", 0.01), "act_order": bool(opts.get("act_order")),
           "static_groups": bool(opts.get("static_groups")), "dtype": settings.dtype}
    # recorded only when not the original behaviour, so older measurements stay valid
    for key, plain in (("scale_search", "minmax"), ("token_weights", "none")):
        if opts.get(key, plain) != plain:
            out[key] = opts[key]
    return out


def measurement_fingerprint(model_fp: str, calib_fp: str, settings) -> dict:
    """What a measurement.json must match to be reused: one definition for `quantize measure`
    and for the measurement a quantize run makes or loads."""
    from quantizer.measurements.fingerprint import job_fingerprint
    return job_fingerprint(model_fp, calib_fp, measure_settings(settings))


class MeasureLoop(LayerLoop):
    """The measurement pass: float layers throughout (every candidate is judged on the same
    inputs), one measurement.json entry per layer, resumable like the quantize pass."""

    def __init__(self, job, store, jobdir, tokens, progress, say):
        super().__init__(job, None, None, jobdir, tokens, progress, say)
        self.store = store
        self.measured = 0  # layers measured by this process (tests assert reuse with it)
        self.seconds: list[float] = []  # wall time of each layer measured by this process
        self.stats: list[dict] = []  # each measured layer's measure_* timings and counts

    @torch.no_grad()
    def run(self) -> None:
        from tqdm.auto import tqdm

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

    def _measure(self, i: int) -> None:
        from ..methods.measure import measure_layer, store_groups
        from ..methods.residual_share import residual_shares

        job = self.job
        opts = job.settings.method_options
        t0 = time.perf_counter()
        layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                           job.padded_intermediate)
        # MoE layers: every expert's groups are measured, so bits are allocated per expert
        ctx = LayerContext(i, layer, job.arch.for_layer(self.model.config, i), self.model.config,
                           job.resolved_settings(), self.inputs, self.layer_kwargs(i), job.device,
                           job.dtype, log=self.say)
        results = measure_layer(ctx, damp=opts.get("damp", 0.01),
                                act_order=bool(opts.get("act_order")),
                                static_groups=bool(opts.get("static_groups")),
                                scale_search=opts.get("scale_search", "minmax"),
                                token_weights=opts.get("token_weights", "none"))
        with residual_shares(ctx) as shares:  # for --error-weights residual, same forward
            self.inputs = ctx.outputs()
        if not shares:
            self.say(f"measure: layer {i} is not h + block(h) in form: no residual shares "
                     f"(--error-weights residual will weigh every group 1)")
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
            self.inputs = [t.to(self.hidden_dev) for t in self.jobdir.load_hidden(start, STAGE)]
            return
        job = self.job
        for i in range(start):  # the measurement propagates float layers: replay them
            layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                               job.padded_intermediate)
            ctx = LayerContext(i, layer, job.arch, self.model.config, job.resolved_settings(),
                               self.inputs, self.layer_kwargs(i), job.device, job.dtype)
            self.inputs = ctx.outputs()
            release_layer(self.model, i)


def packable(candidate: dict, shapes: dict[str, tuple[int, int]], symmetric: bool) -> bool:
    """Whether pack-quantized can store every module of the candidate: codes pack along the
    input dim, asymmetric zero points along the output dim, into whole int32 words."""
    for name, s in candidate.get("modules", {}).items():
        out_f, in_f = shapes[name]
        bits = int(s["bits"])
        if (in_f * bits) % 32 or (not symmetric and (out_f * bits) % 32):
            return False
    return True


def choose_settings(store, arch, target_bpw: float, symmetric: bool, say,
                    shapes: dict[str, tuple[int, int]], error_weights: str = "none",
                    original_shapes: dict[str, tuple[int, int]] | None = None,
                    engine: str = "vllm") -> tuple[dict[str, tuple[int, int]], dict]:
    """{full module name: (bits, group_size)} meeting `target_bpw`, and a summary.
    `shapes` maps each linear's name in the layer to (out_features, in_features) as quantized
    (padded); `original_shapes` the same before padding: the target is bits per weight of
    the original model, so padding is paid for out of it;
    `error_weights`: "none" (every group's block error counts alike) or "residual" (weighed
    by its block's residual-stream share, when the file has them).
    `engine` "vllm": only candidates vLLM serves, and every routed expert of a MoE layer
    one setting (vLLM's fused-MoE layer loads one scheme); a target those cannot meet is
    refused naming the smallest that can. "none": every measured candidate."""
    from quantizer.measurements.optimizer import choose, min_bpw

    from ..methods.measure import module_settings_from_selection

    if not store.has_block_errors:
        say(f"measurement {store.path} has no block errors (measured by an older layerquant): "
            f"comparing each group's own output error; measure again for a better allocation")
    weighted = error_weights == "residual" and store.residual_weighted
    weight = store.residual_weight if weighted else None
    if error_weights == "residual" and not weighted:
        say(f"measurement {store.path} has no residual shares (measured by an older "
            f"layerquant): every group's error weighs 1; measure again to weigh them")
    serving = engine == "vllm"
    per_weights = original_weights(store, shapes, original_shapes or shapes)
    groups, ties, allowed_in = allocation_groups(store, shapes, symmetric, engine, weight)
    t0 = time.perf_counter()
    try:
        choice = choose(groups, float(target_bpw), per_weights, ties)
    except InputError:
        if not serving:
            raise
        raise InputError(_below_servable(target_bpw, min_bpw(groups, per_weights, ties))) \
            from None
    selection = store.selection(choice, allowed_for=allowed_in)
    settings = module_settings_from_selection(selection, arch)
    widths: dict[int, int] = {}
    for bits, _ in settings.values():
        widths[bits] = widths.get(bits, 0) + 1
    summary = {"target_bpw": float(target_bpw), "achieved_bpw": choice.bpw,
               "vllm_candidates_only": serving, "engine": engine,
               "tied_moe_layers": len(ties),
               "error_weights": "residual share" if weighted else "none",
               "objective": choice.objective, "optimality_gap": choice.gap,
               "exact": choice.exact, "seconds": time.perf_counter() - t0,
               "modules_per_bits": {str(k): v for k, v in sorted(widths.items())}}
    say(f"bit allocation for {target_bpw} bpw: {choice.bpw:.4f} bpw achieved "
        f"({'exact' if choice.exact else f'gap {choice.gap:.2e}'}), modules per width "
        f"{summary['modules_per_bits']}")
    return settings, summary


def _expert_block_of(group: dict, expert_block) -> str | None:
    """The fused-MoE block a measured group belongs to (all its modules routed experts of
    one block), else None."""
    blocks = {expert_block(m) for m in group["modules"]}
    return blocks.pop() if len(blocks) == 1 else None


def _expert_ties(store, experts: dict) -> list[list[int]]:
    """Optimiser group indices (file order, as MeasurementStore.groups) per fused-MoE
    layer: every routed expert's gate/up and down group of one layer."""
    ties: dict[tuple[int, str], list[int]] = {}
    k = 0
    for layer in store.layers:
        for name in layer["groups"]:
            block = experts[(layer["index"], name)]
            if block is not None:
                ties.setdefault((layer["index"], block), []).append(k)
            k += 1
    return [t for t in ties.values() if len(t) > 1]


def allocation_groups(store, shapes: dict[str, tuple[int, int]], symmetric: bool,
                      engine: str, weight=None) -> tuple[list, list[list[int]], object]:
    """The optimiser's view of a measurement for this export: its groups with the candidates
    the export stores (and, engine "vllm", vLLM serves), the ties of every routed expert of a
    fused-MoE layer (vllm), and the per-group filter (for `selection`)."""
    from ..export.serving import candidate_servable, expert_block

    serving = engine == "vllm"
    experts = {(layer["index"], name): _expert_block_of(g, expert_block)
               for layer in store.layers for name, g in layer["groups"].items()}

    def allowed_in(index: int, name: str):
        def allowed(c):
            ok = packable(c, shapes, symmetric)
            return ok and (not serving or candidate_servable(
                c, symmetric, experts[(index, name)] is not None))
        return allowed

    groups = store.groups(weight, allowed_for=allowed_in)
    return groups, (_expert_ties(store, experts) if serving else []), allowed_in


def _below_servable(target: float, smallest: float) -> str:
    return (f"--bits {target:g}: no allocation vLLM serves meets it (one setting per fused "
            f"q/k/v and gate/up, every expert of a MoE layer one setting, experts int4/int8, "
            f"zero points at 4/8 bit only); the smallest servable target is "
            f"{math.ceil(smallest * 1000) / 1000:.3f} bpw; --engine none allows every measured "
            f"candidate (the export then may not load in vLLM)")


@dataclass(frozen=True)
class BpwRange:
    """The bits per weight (of the original model) a measurement can reach for an export."""

    least: float  # every group (tie) at its narrowest allowed candidate
    most: float  # every group (tie) at its widest
    engine: str


def bpw_range(store, symmetric: bool, shapes: dict[str, tuple[int, int]],
              original_shapes: dict[str, tuple[int, int]], engine: str) -> BpwRange:
    """What `store` can reach: the optimiser's own groups and ties (allocation_groups), so the
    number said before any work is the one choose_settings would say."""
    from quantizer.measurements.optimizer import max_bpw, min_bpw
    groups, ties, _ = allocation_groups(store, shapes, symmetric, engine)
    per_weights = original_weights(store, shapes, original_shapes)
    return BpwRange(min_bpw(groups, per_weights, ties), max_bpw(groups, per_weights, ties),
                    engine)


def check_target(span: BpwRange, target: float, path) -> None:
    """Refuse a bits target the measurement cannot reach, naming the one bound it misses."""
    if target < span.least * (1 - 1e-12):
        if span.engine == "vllm":
            raise InputError(_below_servable(target, span.least))
        raise InputError(f"--bits {target:g} is below the least measurement {path} can reach: "
                         f"{span.least:.4f} bpw (every group at its narrowest); choose --bits "
                         f"{math.ceil(span.least * 1000) / 1000:.3f} or more")
    if target > span.most * (1 + 1e-12):
        raise InputError(f"--bits {target:g} is above the most measurement {path} offers: "
                         f"{span.most:.4f} bpw (every group at its widest); choose --bits "
                         f"{math.floor(span.most * 1000) / 1000:.3f} or less")


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
    from ..run.pipeline import linear_shapes
    s = job.settings
    return bpw_range(store, s.symmetric, linear_shapes(job.source, job.padded_intermediate),
                     linear_shapes(job.source, None), s.engine)


def original_weights(store, shapes: dict[str, tuple[int, int]],
                     original_shapes: dict[str, tuple[int, int]]) -> float:
    """How many weights of the original model the measured groups quantize: each group's
    (padded) numel scaled by its linears' original / padded sizes."""
    total = 0.0
    for layer in store.layers:
        for g in layer["groups"].values():
            padded = sum(shapes[m][0] * shapes[m][1] for m in g["modules"])
            original = sum(original_shapes[m][0] * original_shapes[m][1] for m in g["modules"])
            total += g["numel"] * original / padded
    return total


def load_measurement(path, fingerprint: dict):
    from quantizer.measurements.store import MeasurementStore

    store = MeasurementStore.load(path)
    store.check_fingerprint(fingerprint)
    return store


def run_measure(model_path, output, settings, progress: bool = True, overwrite: bool = False,
                resume: bool = False, work_dir=None, log=None) -> dict:
    """`quantize measure`: the measurement pass alone, into the file `output`. Resumable
    like a quantize job (OUTPUT.job holds the layers measured so far); the file serves any
    number of later `--measurement` runs with the same model, calibration and GPTQ options."""
    import shutil
    from pathlib import Path

    from quantizer.measurements.atomic import atomic_write_bytes
    from quantizer.measurements.fingerprint import fingerprint_calibration, fingerprint_model
    from quantizer.measurements.jobstate import JobDir
    from quantizer.measurements.store import MeasurementStore

    from ..parallel.distributed import world
    from ..run.outputs import check_measurement_output, check_paths
    from ..run.pipeline import (calibration_tokens, discard_refused_job, plan_job, prepare_skeleton,
                                say_once)

    say = say_once(log or (lambda msg: None))
    if world().distributed:
        raise InputError("quantize measure runs in one process (no --devices / torchrun)")
    t0 = time.perf_counter()
    settings.adaptive = True
    settings.validate()
    output = Path(output).absolute()
    work = Path(work_dir).absolute() if work_dir else output.parent / (output.name + ".job")
    check_paths(model_path, output, work, what="measurement file")
    jobdir = JobDir(work)
    check_measurement_output(output, overwrite, resume, jobdir.peek() is not None)
    job = plan_job(model_path, settings)  # validates: adaptive GPTQ options, act-order default
    prepare_skeleton(job)
    tokens = calibration_tokens(job)
    fingerprint = measurement_fingerprint(fingerprint_model(job.source.path),
                                          fingerprint_calibration(tokens), settings)
    created = not work.exists()
    jobdir.begin(fingerprint, resume=resume, overwrite=overwrite, first_stage=STAGE)
    for n in job.notes:  # after the last refusal: a refused run says one line only
        say(n)
    try:
        store = MeasurementStore.open(jobdir.path / MEASURE_NAME, fingerprint)
        loop = MeasureLoop(job, store, jobdir, tokens, progress, say)
        loop.run()
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, (jobdir.path / MEASURE_NAME).read_bytes())
        jobdir.finish()
    except InputError as e:
        discard_refused_job(jobdir, created, e)
        raise
    finally:
        jobdir.unlock()
    shutil.rmtree(work, ignore_errors=True)
    return {"model": str(model_path), "measurement": str(output),
            "layers": job.source.num_layers, "layers_measured": loop.measured,
            "measure_seconds": loop.seconds, "measure_stats": loop.stats,
            "settings": measure_settings(settings), "notes": job.notes,
            "seconds": time.perf_counter() - t0}


def check_adaptive(settings) -> None:
    if settings.method != "gptq":
        raise InputError(f"fractional --bits / --measurement need --method gptq (adaptive "
                         f"GPTQ), got --method {settings.method}")


__all__ = ["MeasureLoop", "run_measure", "choose_settings", "measure_settings", "load_measurement",
           "MEASURE_NAME", "LayerRecord"]
