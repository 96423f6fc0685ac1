"""The layer loop: load -> calibrate -> quantize -> propagate -> write -> free, one decoder
layer at a time, then assemble the export. Host and GPU memory hold one layer plus the
calibration hidden states, never the model."""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import AUTO_GROUP_SIZES, QuantSettings, resolve_group_size
from . import warmup
from .errors import InputError
from .export import get_exporter
from .export.serving import NotServable
from .export.writer import copy_tokenizer, publish, write_config
from .inputs import check_calibration_length
from .outputs import EXPORT, RefusedLate, check_output_dir, check_paths, write_marker
from .layer_loop import LayerLoop
from .methods import get_method
from .plan_apply import plan_memory
from .report import QuantResult
from .source import CheckpointSource
from .tp import check_tp, problem_summary, tp_multiple

def pack_multiple(bits: float, adaptive: bool) -> int:
    """Widths every packed layout can hold whole: AWQ packs 8 outputs per word; b-bit codes
    fill whole int32 words in runs of 32/gcd(b, 32) values; mixed widths need 32."""
    if adaptive:
        return 32
    return math.lcm(8, 32 // math.gcd(int(bits), 32))



@dataclass
class Job:
    """Everything decided before any weight is read."""

    source: CheckpointSource
    settings: QuantSettings
    group_size: int
    intermediate: int
    padded_intermediate: int | None
    device: torch.device
    dtype: torch.dtype
    export_format: str
    notes: list[str] = field(default_factory=list)
    plan: object = None  # quantizer.plan.Plan (GPU runs; CPU runs with --ram-budget)
    max_shard_bytes: int = 1 << 30  # the export's shards (a shard is written from RAM)
    skeleton: object = None  # the meta model, built and checked before the job directory

    def take_skeleton(self):
        """The skeleton prepare_skeleton built (once: the next pass builds its own)."""
        model, self.skeleton = self.skeleton, None
        return model

    @property
    def arch(self):
        return self.source.arch

    def resolved_settings(self) -> QuantSettings:
        """Settings as methods see them: the group size resolved to an integer."""
        r = copy.copy(self.settings)
        r.group_size = self.group_size
        return r


def prepare_skeleton(job: Job) -> None:
    """Build transformers' model of this config (meta layers; embeddings and head read) and
    check every layer's weights against it: a weight whose shape disagrees with config.json
    is refused in one line before the job directory exists, not at its layer."""
    from .inputs import check_layer_shapes
    from .skeleton import build_skeleton
    job.skeleton = build_skeleton(job.source, "cpu", job.dtype, job.padded_intermediate)
    check_layer_shapes(job.skeleton, job.source, job.intermediate, job.padded_intermediate)


def plan_job(model_path, settings: QuantSettings,
             max_shard_bytes: int = 1 << 30) -> Job:
    settings.validate()
    warmup.start(settings)  # CUDA, cuBLAS, cuSOLVER, Triton: on a thread beside the imports
    source = CheckpointSource(model_path, originals=True)  # refuses what it cannot read
    check_calibration_length(source.raw_config, settings.calib.seqlen, settings.calib.samples)
    arch = source.arch
    cfg = source.raw_config
    fmt = settings.export_format
    if settings.is_adaptive:
        from .adaptive import check_adaptive
        check_adaptive(settings)
        if fmt not in ("auto", "compressed-tensors"):
            raise InputError("mixed bit widths are exported as compressed-tensors only "
                             f"(got --format {fmt})")
        fmt = "compressed-tensors"
    else:
        opts = settings.method_options
        # act-order without static groups writes a g_idx, which the AWQ layout cannot hold
        g_idx = bool(opts.get("act_order")) and not opts.get("static_groups")
        if fmt == "auto":  # what vLLM serves for each: AWQ GEMM for 4-bit, else GPTQ / CT
            fmt = ("gptq" if settings.method == "gptq" or (settings.method == "awq-gptq"
                                                           and g_idx) else
                   "awq" if settings.bits == 4 else "compressed-tensors")
    if settings.symmetric is None:  # the default: what the format's fast serving path takes
        from .export.serving import default_symmetric
        settings.symmetric = default_symmetric(fmt)
    if not settings.is_adaptive:
        get_exporter(fmt).check_supported(settings.bits, settings.symmetric,
                                          bool(opts.get("act_order")) if fmt != "awq"
                                          else g_idx)
    notes = []
    if source.original is not None:
        from .originals import describe
        notes.append(describe(source.original, len(source.quantized_names())))
    intermediate = int(getattr(arch.text, arch.intermediate_key, 0) or 0)
    multiple = pack_multiple(settings.bits, settings.is_adaptive)
    padded, group_size, msg = padded_width_and_group(source, settings, intermediate, multiple)
    tp = settings.pad_for_tp
    if padded and tp:
        notes.append(f"{arch.intermediate_key} {intermediate} -> {padded} for TP {tp} "
                     f"({group_label(group_size)}): zero-padded so each of {tp} GPUs gets "
                     f"{padded // tp} channels, a multiple of {tp_multiple(tp, group_size) // tp}"
                     f", and the packed layout holds whole words (exact: padded channels "
                     f"contribute 0)")
    elif padded:
        notes.append(f"{arch.intermediate_key} {intermediate} -> {padded}: zero-padded to whole "
                     f"packed words and {group_label(group_size)} groups (exact: padded channels "
                     f"contribute 0)")
    elif tp:
        notes.append(f"{arch.intermediate_key} {intermediate} already splits over TP "
                     f"{settings.pad_for_tp} ({group_label(group_size)}): no padding needed")
    notes.append(msg)
    notes += check_tp_targets(cfg, arch, settings, padded, group_size)
    for name, out_f in linear_out_features(source, padded).items():
        if out_f % multiple:
            raise InputError(f"{name}: out_features={out_f} is not a multiple of "
                             f"{multiple}; the packed export cannot hold it")
    device = settings.torch_device()
    dtype = settings.working_dtype(config_dtype_from_raw(cfg))
    job = Job(source, copy.copy(settings), group_size, intermediate, padded, device, dtype, fmt,
              notes)
    if not settings.is_adaptive:  # adaptive: checked once the bit allocation is known
        check_planned(job)
    job.max_shard_bytes = max_shard_bytes
    if device.type == "cuda":
        warmup.wait()  # the plan reads free memory: after the warm-up let go of its own
    job.plan = plan_memory(job) if device.type in ("cuda", "cpu") else None
    if job.plan is None:  # a CPU run without --ram-budget keeps hidden states in RAM
        check_host_memory(job)
    return job


def check_host_memory(job: Job) -> None:
    """Without a GPU plan the calibration hidden states wait in host memory, a layer's inputs
    beside its outputs: refuse before any work when they cannot fit (a 100k-token
    --calib-seqlen was a killed run, not a refusal)."""
    from .memsize import default_ram_budget, format_size_up, parse_size
    s = job.settings
    if s.calib.samples <= 0 or s.hidden_device == "disk":
        return
    hidden = int(job.source.raw_config.get("hidden_size") or 0)
    need = 2 * s.calib.samples * s.calib.seqlen * hidden * (torch.finfo(job.dtype).bits // 8)
    budget = parse_size(s.ram_budget) if s.ram_budget else default_ram_budget()
    if need > budget:
        have = f"--ram-budget {s.ram_budget}" if s.ram_budget else "available host memory"
        raise InputError(f"--calib-samples {s.calib.samples} x --calib-seqlen {s.calib.seqlen} "
                         f"needs {format_size_up(need)} of host memory for the calibration "
                         f"hidden states, more than the {format_size_up(budget)} of {have}: "
                         f"use fewer samples, a shorter --calib-seqlen, --hidden-device disk, or "
                         f"--ram-budget (the host plan then moves them to disk)")


def serving_tp(settings: QuantSettings) -> tuple[int, bool]:
    """The TP size the serving rules check at, and whether the user asked for it (then a
    shape off the Marlin path is an error, as --tp-size refuses it before any work)."""
    n = settings.tp_size or settings.pad_for_tp
    return (n or 1), bool(n)


def check_planned(job: "Job", module_settings: dict | None = None) -> list[str]:
    """The serving rules on the export this job will write, before any weight is read (or,
    adaptive, before the quantize pass): InputError naming every error and its fix; the
    warnings come back as lines."""
    from .export.serving import Scheme, check_view, planned_view, refuse_errors

    s, arch, cfg = job.settings, job.arch, job.source.raw_config
    opts = s.method_options
    g_idx = bool(opts.get("act_order")) and not opts.get("static_groups")
    shapes = linear_shapes(job.source, job.padded_intermediate)
    names, rel = [], {}
    for i in range(job.source.num_layers):
        for n in arch.for_layer(cfg, i).linears:
            full = f"{arch.layer_prefix(i)}.{n}"
            names.append(full)
            rel[full] = n
    awq = job.export_format == "awq"

    def scheme(full: str) -> Scheme:
        bits, gs = (module_settings or {}).get(full, (s.bits, job.group_size))
        return Scheme(int(bits), int(gs), False if awq else bool(s.symmetric), g_idx)

    def rel_shape(full: str):
        return shapes.get(rel[full]) or _expert_shape(job, rel[full], shapes)

    config = dict(cfg)
    if job.padded_intermediate:
        config[arch.intermediate_key] = job.padded_intermediate
    view = planned_view(config, export_quantization_config(job, module_settings),
                        {n: rel_shape(n) for n in names}, names, scheme)
    tp, strict = serving_tp(s)
    report = check_view(view, tp, s.engine, strict)
    refuse_errors(report, "refused before any work" if module_settings is None else
                  "refused after the bit allocation, before quantizing")
    return [f.line() for f in report.warnings]


def _expert_shape(job: "Job", name: str, shapes: dict) -> tuple[int, int]:
    # Every expert of a family has one shape: representative layers list each expert's
    # linears, so a missing name is only an expert of a MoE layer not listed there.
    key = next(k for k in shapes if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]
               and ".experts." in k)
    return shapes[key]


def padded_width_and_group(source: CheckpointSource, settings: QuantSettings, intermediate: int,
                           multiple: int) -> tuple[int | None, int, str]:
    """(padded MLP width or None, group size, group-size note).

    Every quantized input width but the MLP intermediate (which down_proj reads) is fixed; the
    intermediate can be zero-padded exactly. Explicit group sizes are checked on the fixed
    widths. Auto takes the largest of 128/64/32 dividing the fixed widths that also fits the
    intermediate as it is (after whole-word padding), else the largest dividing the fixed
    widths with the intermediate padded to it. The width is then padded to a multiple of the
    packing `multiple`, the group size and, under --pad-for-tp N, TP N's requirement."""
    fixed = {name: w for name, w in linear_in_features(source, None).items()
             if name != source.arch.mlp_down}
    tp = settings.pad_for_tp
    base = -(-intermediate // multiple) * multiple
    if settings.group_size == "auto":
        options = [g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in fixed.values())]
        fitting = [g for g in options
                   if base % g == 0 and (not tp or base % tp_multiple(tp, g) == 0)]
        group_size = (fitting or options or [-1])[0]
        msg = (f"group size auto -> {group_label(group_size)}"
               + ("" if fitting or not options else " (the MLP width is padded to fit it)"))
    else:
        group_size, msg = resolve_group_size(settings.group_size, fixed)
    unit = math.lcm(multiple, max(group_size, 1))
    if tp:
        unit = math.lcm(unit, tp_multiple(tp, group_size))
    width = -(-intermediate // unit) * unit
    arch = source.arch
    if arch.moe is not None and all(arch.is_moe_layer(source.raw_config, i)
                                    for i in arch.representative_layers(source.raw_config)):
        width = intermediate  # no dense MLP to pad (Mixtral's intermediate_size is experts')
    if width != intermediate and not arch.mlp_down:
        # no separate gate/up and down to pad (Phi-3's fused gate_up_proj): refuse, not guess
        raise InputError(f"{arch.name}: its MLP width {intermediate} would need padding to "
                         f"{width} for {group_label(group_size)}, but its MLP has no separate "
                         f"gate/up and down projections to pad; choose a --group-size that "
                         f"divides it")
    if width != intermediate and arch.moe is not None:
        # Expert widths are never padded (they are in `fixed`); a dense MLP width of a MoE
        # model could be, but no run has needed it yet: refuse rather than guess.
        raise InputError(f"{source.arch.intermediate_key}={intermediate} would need padding "
                         f"to {width} for {group_label(group_size)}; MoE models are not "
                         f"padded: choose a --group-size that divides it")
    return (width if width != intermediate else None), group_size, msg


def group_label(group_size: int) -> str:
    return "per-channel" if group_size == -1 else f"g{group_size}"


def check_tp_targets(cfg: dict, arch, settings: QuantSettings, padded: int | None,
                     group_size: int) -> list[str]:
    """Refuse before any work when the export would not load at --tp-size (or --pad-for-tp)
    N; notes saying which TP sizes were checked otherwise."""
    targets = sorted({n for n in (settings.tp_size, settings.pad_for_tp) if n})
    exported = dict(cfg)
    if padded:  # a VLM keeps the width in text_config
        exported.update(arch.config_update(cfg, arch.intermediate_key, padded))
    notes = []
    for n in targets:
        problems = check_tp(exported, arch, n, group_size)
        if problems:
            raise InputError(problem_summary(problems, n, group_size,
                                             padded=settings.pad_for_tp == n))
        notes.append(f"TP-{n}: ok (every quantized module's per-GPU shape aligned at "
                     f"{group_label(group_size)})")
    return notes


# Decisions of the planner this version carries out (the planner's search and OOM recovery
# take no other moves); a plan asking for more is reported, never silently dropped.
def config_dtype_from_raw(cfg: dict) -> torch.dtype:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, d, torch.float32)


def layer_linears(source: CheckpointSource):
    """(tensor name, linear name) of one layer of each kind: dense, and MoE (every expert)."""
    arch = source.arch
    for i in arch.representative_layers(source.raw_config):
        for name in arch.for_layer(source.raw_config, i).linears:
            yield f"{arch.layer_prefix(i)}.{name}.weight", name


def linear_in_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    widths = {}
    for key, name in layer_linears(source):
        widths[name] = padded if (padded and name == source.arch.mlp_down) else \
            source.shape(key)[1]
    return widths


def linear_shapes(source: CheckpointSource, padded: int | None) -> dict[str, tuple[int, int]]:
    """{linear name: (out_features, in_features)} of every layer kind's linears, with the MLP
    width `padded` (None: as in the checkpoint)."""
    outs, ins = linear_out_features(source, padded), linear_in_features(source, padded)
    return {name: (outs[name], ins[name]) for name in outs}


def linear_out_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    return {name: (padded if padded and name in source.arch.mlp_gate_up else
                   source.shape(key)[0])
            for key, name in layer_linears(source)}


def calibration_tokens(job: Job) -> torch.Tensor | None:
    method = get_method(job.settings.method)
    c = job.settings.calib
    if not method.needs_calibration and c.samples <= 0:
        return None
    from .tokens import calibration_batch, tokenizer_or_bytes
    tok, note = tokenizer_or_bytes(job.source)
    if note:
        job.notes.append(note)
    return calibration_batch(tok, c.source, c.samples, c.seqlen, c.seed)


def run_quantize(model_path, output, settings: QuantSettings, progress: bool = True,
                 overwrite: bool = False, resume: bool = False, work_dir=None,
                 max_shard_bytes: int = 1 << 30, log=None) -> QuantResult:
    """Plan, then run the resumable job: quantize every layer into the job directory, then
    assemble the export and publish it under `output` only when complete.

    Everything is checked before anything is written: settings, paths (the output is never
    the input, inside it or around it), the model, the measurement, an existing output (only
    our own export is ever replaced); a refusal leaves nothing on disk."""
    from quantizer.measurements.fingerprint import (fingerprint_calibration, fingerprint_model,
                                                    job_fingerprint)
    from quantizer.measurements.jobstate import JobDir

    from .distributed import begin_job, world
    from .options import check_positive_size

    t_start = time.perf_counter()
    w = world()
    say = say_once((log if w.main else None) or (lambda msg: None))
    if w.distributed:
        check_distributed(settings, w.size)
        settings.device = str(w.device)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other: pass --resume to "
                         "continue the job or --overwrite to start over, not both")
    settings.validate()
    check_positive_size("--max-shard-size", max_shard_bytes)
    output = Path(output).absolute()
    work = Path(work_dir).absolute() if work_dir else output.parent / (output.name + ".job")
    check_paths(model_path, output, work, inputs=input_files(settings))
    job = plan_job(model_path, settings, max_shard_bytes)
    phases = {"plan": time.perf_counter() - t_start}  # fixed costs, apart from the layers
    t0 = time.perf_counter()
    prepare_skeleton(job)
    phases["skeleton"] = time.perf_counter() - t0  # meta model, embeddings, shape check
    t0 = time.perf_counter()
    tokens = calibration_tokens(job)
    phases["calibration_tokens"] = time.perf_counter() - t0
    jobdir = JobDir(work)
    fingerprint = job_fingerprint(fingerprint_model(job.source.path),
                                  fingerprint_calibration(tokens) if tokens is not None else None,
                                  settings.result_dict())
    measure_fp = None
    if settings.is_adaptive:
        from .adaptive import check_measurement, measurement_fingerprint
        measure_fp = measurement_fingerprint(fingerprint["model"], fingerprint["calibration"],
                                             settings)
        if settings.measurement:
            check_measurement(job, measure_fp)
    check_output(output, work, overwrite, resume)
    created = not work.exists()
    first = "measure" if settings.is_adaptive and not settings.measurement else "quantize"
    # rank 0 alone owns (locks and writes) the job directory; other ranks read it
    jobdir, state = begin_job(w, jobdir, fingerprint, resume=resume, overwrite=overwrite,
                              first_stage=first)
    for n in job.notes:  # after the last refusal: a refused run says one line only
        say(n)
    if overwrite and w.main:  # a later --resume of this job may replace the old export too
        jobdir.set_note("replaces_output", True)
    extra = {"processes": w.size} if w.distributed else {}
    if job.plan is not None:
        from .plan import CUDA_CONTEXT
        extra["plan"] = {"predicted_peak": {dp.device.label: dp.predicted_peak
                                            for dp in job.plan.devices},
                         "ram_peak": job.plan.ram_peak,
                         # the part of a predicted peak torch's allocator never sees
                         "cuda_context": CUDA_CONTEXT,
                         "decisions": {dp.device.label: dict(vars(dp.decisions))
                                       for dp in job.plan.devices},
                         "text": job.plan.format()}
    try:
        if state["stage"] == "done" or (state["stage"] == "export" and output.is_dir()
                                        and not (work / "final").exists()):
            say(f"job already complete: {output}")
            records = LayerLoop.records(jobdir)
        else:
            options = dict(settings.method_options)
            if settings.is_adaptive:
                options["module_settings"], extra["bit_allocation"] = adaptive_settings(
                    job, jobdir, tokens, measure_fp, progress, say, extra)
            method = get_method(settings.method, **options)
            exporter = get_exporter(job.export_format)
            if jobdir.stage == "quantize":
                t0 = time.perf_counter()
                loop = LayerLoop(job, method, exporter, jobdir, tokens, progress, say)
                phases["embed"] = time.perf_counter() - t0  # layer-0 inputs (a skeleton after measuring)
                records = loop.run()
                jobdir.set_stage("export")
            else:
                records = LayerLoop.records(jobdir)
            if w.main:
                t0 = time.perf_counter()
                assemble(job, jobdir, work / "final", max_shard_bytes,
                         options.get("module_settings"))
                extra["serving"] = check_staged(job, work / "final")
                publish(work / "final", output)
                phases["export"] = time.perf_counter() - t0
        jobdir.finish()
        w.barrier()  # every rank is done with the job directory before it goes
    except NotServable as e:
        # Every layer is done: keep the job directory, so a fixed exporter re-exports it
        # (--resume) without quantizing again.
        jobdir.unlock()
        raise NotServable(f"{e}\njob directory kept: {work} (rerun with --resume once "
                          f"fixed)") from None
    except InputError as e:
        if w.main:
            discard_refused_job(jobdir, created, e)
        jobdir.unlock()
        raise
    except BaseException:
        jobdir.unlock()  # the job directory stays: rerun with --resume
        raise
    jobdir.unlock()
    if w.main:
        shutil.rmtree(work, ignore_errors=True)
    extra["phases_s"] = phases
    return QuantResult(model=str(model_path), output=str(output), settings=settings.to_dict(),
                       group_size=job.group_size, export_format=job.export_format,
                       notes=job.notes, layers=records,
                       seconds=time.perf_counter() - t_start, extra=extra)


def check_output(output: Path, work: Path, overwrite: bool, resume: bool) -> None:
    """May this run publish at `output`? (outputs.check_output_dir; a resumed job may replace
    our old export when it was started with --overwrite, or is complete.)"""
    from quantizer.measurements.jobstate import JobDir
    prior = JobDir(work).peek() if resume else None
    check_output_dir(output, overwrite, resume, may_replace=bool(prior) and (
        prior["stage"] in ("export", "done") or bool(prior["notes"].get("replaces_output"))))


def input_files(settings: QuantSettings) -> dict[str, str]:
    """Files besides the model that a run reads: they must not lie where it writes."""
    files = {}
    if settings.measurement:
        files["--measurement"] = settings.measurement
    if Path(str(settings.calib.source)).expanduser().is_file():
        files["--calib-data"] = str(settings.calib.source)
    return files


def discard_refused_job(jobdir, created: bool, error: InputError) -> None:
    """Bad input (NaN weights, a shape config.json disagrees with) cannot be fixed by resuming:
    a job this run started is removed, so that fixing the input and rerunning just works. A
    resumed job is kept, and so is one refused late (RefusedLate: its work is reusable)."""
    if isinstance(error, RefusedLate) or not getattr(jobdir, "fresh", False):
        return
    if created:
        shutil.rmtree(jobdir.path, ignore_errors=True)
    else:  # the folder was there (empty, or a job --overwrite cleared): empty it again
        jobdir.wipe()
        jobdir.unlock()
        (jobdir.path / "lock").unlink(missing_ok=True)


def say_once(say):
    """`say` that drops a message it has already said in this run (a note that holds for
    every layer, e.g. an AWQ scale group skipped by the architecture, is said once)."""
    seen: set[str] = set()

    def once(msg: str) -> None:
        if msg not in seen:
            seen.add(msg)
            say(msg)
    return once


def check_distributed(settings: QuantSettings, processes: int) -> None:
    """What a multi-process run cannot do: refuse before any work."""
    if settings.is_adaptive:
        raise InputError("adaptive bit allocation (--bits 4.5, --adaptive, --measurement) "
                         "runs on one device only; drop --devices")
    shards = min(settings.calib.shards, max(settings.calib.samples, 1))
    if get_method(settings.method).needs_calibration and processes > shards:
        raise InputError(f"{processes} processes but only {shards} calibration shards "
                         f"(--calib-shards {settings.calib.shards}, --calib-samples "
                         f"{settings.calib.samples}): each process needs a shard; use at most "
                         f"{shards} devices")


def adaptive_settings(job: Job, jobdir, tokens, measure_fp, progress, say, extra):
    """Measure (or reuse a measurement), then allocate bits: {module: (bits, group_size)}."""
    from quantizer.measurements.store import MeasurementStore

    from .adaptive import MEASURE_NAME, MeasureLoop, choose_settings, load_measurement

    s = job.settings
    if s.measurement:
        store = load_measurement(s.measurement, measure_fp)
        say(f"reusing measurement {s.measurement} (no measuring pass)")
    else:
        store = MeasurementStore.open(jobdir.path / MEASURE_NAME, measure_fp)
        if jobdir.stage == "measure":
            loop = MeasureLoop(job, store, jobdir, tokens, progress, say)
            loop.run()
            extra["layers_measured"] = loop.measured
            extra["measure_seconds"] = loop.seconds
            extra["measure_stats"] = loop.stats
            jobdir.set_stage("quantize")
    if not store.is_complete(job.source.num_layers):
        raise InputError(f"measurement {store.path} covers {store.layers_done()} of "
                         f"{job.source.num_layers} layers")
    extra["measurement"] = str(store.path)
    try:
        settings, summary = choose_settings(
            store, job.arch, float(s.bits), s.symmetric, say,
            linear_shapes(job.source, job.padded_intermediate),
            s.method_options.get("error_weights", "none"), linear_shapes(job.source, None),
            s.engine)
        job.notes += [f"serving {w}" for w in check_planned(job, settings)]
    except InputError as e:
        if s.measurement:
            raise
        # measured by this run (hours, on a big model): a target it cannot serve keeps it
        raise RefusedLate(f"{e}; this run's measurement is kept in {store.path}: copy it "
                          f"out and rerun with --measurement FILE --overwrite") from None
    return settings, summary


def export_quantization_config(job: Job, module_settings: dict | None = None) -> dict:
    """config.json's quantization_config for this job (per-module settings: adaptive)."""
    from .export.serving import router_ignore

    exporter = get_exporter(job.export_format)
    opts = job.settings.method_options
    act_order = bool(opts.get("act_order"))
    return exporter.quantization_config(
        bits=job.settings.bits, group_size=job.group_size,
        not_converted=job.arch.not_converted(job.export_format),
        symmetric=job.settings.symmetric,
        act_order=act_order, static_groups=bool(opts.get("static_groups")),
        damp=float(opts.get("damp", 0.01)), float_linears=router_ignore(job.arch),
        module_bits=None if module_settings is None else {
            name: (bits, gs, job.settings.symmetric, act_order)
            for name, (bits, gs) in module_settings.items()})


def check_staged(job: Job, staged: Path) -> dict:
    """The serving rules on the written export before it is published: NotServable (the job
    directory is kept) on any error; warnings go into layerquant.json and the notes."""
    from .export.serving import NotServable, check_export, refuse_errors

    tp, strict = serving_tp(job.settings)
    report = check_export(staged, tp, job.settings.engine, strict)
    record = json.loads((staged / "layerquant.json").read_text())
    record["serving"] = report.to_dict()
    (staged / "layerquant.json").write_text(json.dumps(record, indent=2, sort_keys=True,
                                                       default=str))
    refuse_errors(report, "not published", NotServable)
    job.notes += [f"serving {f.line()}" for f in report.warnings]
    return report.to_dict()


def assemble(job: Job, jobdir, staged: Path, max_shard_bytes: int,
             module_settings: dict | None = None) -> None:
    """Final checkpoint: the shards (written in place layer by layer, or assembled from
    layer files: export/store.py), config.json, tokenizer, layerquant.json."""
    from .export.store import write_shards
    source = job.source
    write_shards(job, jobdir, staged, max_shard_bytes)
    qcfg = export_quantization_config(job, module_settings)
    if module_settings is not None and (jobdir.path / "measurement.json").is_file():
        shutil.copy2(jobdir.path / "measurement.json", staged / "measurement.json")
    updates = {"quantization_config": qcfg, "torch_dtype": job.settings.out_dtype}
    if job.padded_intermediate:
        updates.update(job.arch.config_update(source.raw_config, job.arch.intermediate_key,
                                              job.padded_intermediate))
    write_config(source.path, staged, updates)
    copy_tokenizer(source.path, staged)
    (staged / "layerquant.json").write_text(json.dumps({
        "source": str(source.path.absolute()), "method": job.settings.method,
        "settings": job.settings.result_dict(), "group_size": job.group_size,
        "original_intermediate_size": job.intermediate, "notes": job.notes}, indent=2,
        sort_keys=True, default=str))
    write_marker(staged, EXPORT)  # last: it lists every file of the export
