"""The layer loop: load -> calibrate -> quantize -> propagate -> write -> free, one decoder
layer at a time, then assemble the export. Host and GPU memory hold one layer plus the
calibration hidden states, never the model."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import QuantSettings, resolve_group_size
from .errors import InputError
from .export import get_exporter
from .export.writer import ShardWriter, copy_tokenizer, publish, read_tensor_file, write_config
from .layer_context import LayerContext
from .memory import MemoryMeter
from .methods import get_method
from .report import LayerRecord, QuantResult
from .skeleton import (build_skeleton, capture_layer0_inputs, config_dtype, decoder_layers,
                       to_device,
                       load_layer, release_layer)
from .source import CheckpointSource

PACK_MULTIPLE = 8  # packed layouts hold 8 output channels per int32 word (4-bit)


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

    @property
    def arch(self):
        return self.source.arch


def plan_job(model_path, settings: QuantSettings) -> Job:
    settings.validate()
    source = CheckpointSource(model_path)
    arch = source.arch
    cfg = source.raw_config
    if not isinstance(settings.bits, int):
        raise InputError(f"fractional --bits {settings.bits} needs the adaptive method "
                         "(--method gptq with a measurement)")
    fmt = settings.export_format
    if fmt == "auto":
        fmt = "gptq" if settings.method == "gptq" or settings.bits != 4 else "awq"
    exporter = get_exporter(fmt)
    exporter.check_supported(settings.bits, settings.symmetric,
                             bool(settings.method_options.get("act_order")))
    notes = []
    intermediate = int(cfg[arch.intermediate_key])
    padded = None
    if intermediate % PACK_MULTIPLE:
        padded = -(-intermediate // PACK_MULTIPLE) * PACK_MULTIPLE
        notes.append(f"{arch.intermediate_key} {intermediate} -> {padded}: zero-padded so the "
                     f"packed layout holds whole words (exact: padded channels contribute 0)")
    widths = linear_in_features(source, padded)
    group_size, msg = resolve_group_size(settings.group_size, widths)
    notes.append(msg)
    for name, out_f in linear_out_features(source, padded).items():
        if out_f % PACK_MULTIPLE:
            raise InputError(f"{name}: out_features={out_f} is not a multiple of "
                             f"{PACK_MULTIPLE}; the packed export cannot hold it")
    device = settings.torch_device()
    dtype = settings.working_dtype(config_dtype_from_raw(cfg))
    return Job(source, settings, group_size, intermediate, padded, device, dtype, fmt, notes)


def config_dtype_from_raw(cfg: dict) -> torch.dtype:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, d, torch.float32)


def linear_in_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    widths = {}
    for name in source.arch.linears:
        shape = source.shape(f"{source.arch.layer_prefix(0)}.{name}.weight")
        widths[name] = padded if (padded and name == source.arch.mlp_down) else shape[1]
    return widths


def linear_out_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    return {name: (padded if padded and name in source.arch.mlp_gate_up else
                   source.shape(f"{source.arch.layer_prefix(0)}.{name}.weight")[0])
            for name in source.arch.linears}


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
                 overwrite: bool = False, max_shard_bytes: int = 1 << 30,
                 log=None) -> QuantResult:
    t_start = time.perf_counter()
    job = plan_job(model_path, settings)
    output = Path(output).absolute()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(f"output {output} exists; pass --overwrite to replace it")
    work = output.parent / (output.name + ".partial")
    say = log or (lambda msg: None)
    for n in job.notes:
        say(n)
    try:
        tokens = calibration_tokens(job)
        if work.exists():
            shutil.rmtree(work)
        (work / "layers").mkdir(parents=True)
        records = quantize_layers(job, tokens, work / "layers", progress, say)
        staged = work / "final"
        assemble(job, work / "layers", staged, max_shard_bytes)
        publish(staged, output)
        shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return QuantResult(model=str(model_path), output=str(output), settings=settings.to_dict(),
                       group_size=job.group_size, export_format=job.export_format,
                       notes=job.notes, layers=records,
                       seconds=time.perf_counter() - t_start)


@torch.no_grad()
def quantize_layers(job: Job, tokens, layer_dir: Path, progress: bool, say) -> list[LayerRecord]:
    s = job.settings
    source, arch = job.source, job.arch
    model = build_skeleton(source, "cpu", job.dtype, job.padded_intermediate)
    method = get_method(s.method, **s.method_options)
    exporter = get_exporter(job.export_format)
    hidden_dev = torch.device("cpu") if s.hidden_device in ("auto", "cpu") else torch.device(
        s.hidden_device)
    inputs, kwargs = [], {}
    if tokens is not None:
        chunk = max(1, s.chunk_size)
        _, kwargs = capture_layer0_inputs(model, tokens[:1])
        embed = model.get_input_embeddings()
        inputs = [embed(tokens[i:i + chunk]).to(hidden_dev) for i in range(0, len(tokens), chunk)]
        kwargs = to_device(kwargs, job.device, job.dtype)
    meter = MemoryMeter(job.device)
    records = []
    bar = _progress(source.num_layers, progress)
    for i in range(source.num_layers):
        meter.reset()
        t0 = time.perf_counter()
        layer = load_layer(model, source, i, job.device, job.dtype, job.padded_intermediate)
        t_load = time.perf_counter() - t0
        ctx = LayerContext(i, layer, arch, model.config, _resolved(s, job.group_size), inputs,
                           kwargs, job.device, job.dtype, log=say)
        fp_out = ctx.outputs() if inputs else None
        t1 = time.perf_counter()
        quantized = method.quantize_layer(ctx)
        t_quant = time.perf_counter() - t1
        w_err = {}
        for name, q in quantized.items():
            w = ctx.module(name).weight.float()
            w_err[name] = float((q.dequantize().to(w.device) - w).norm() / w.norm().clamp(min=1e-12))
            ctx.set_quantized(name, q)
        out_err = None
        if inputs:
            new = ctx.outputs()
            out_err = _relative_error(new, fp_out)
            inputs = new
            ctx.inputs = inputs
        t2 = time.perf_counter()
        tensors = layer_export_tensors(layer, arch.layer_prefix(i), quantized, exporter,
                                       getattr(torch, s.out_dtype))
        _atomic_save(tensors, layer_dir / f"layer-{i:05d}.safetensors")
        t_write = time.perf_counter() - t2
        release_layer(model, i)
        del layer, ctx, fp_out, tensors
        records.append(LayerRecord(index=i, weight_error=max(w_err.values()),
                                   output_error=out_err, seconds=time.perf_counter() - t0,
                                   load_s=t_load, quantize_s=t_quant, write_s=t_write,
                                   peak_bytes=meter.peak(), stats=dict()))
        bar.set_postfix_str(f"err {records[-1].error_str()}")
        bar.update(1)
    bar.close()
    return records


def layer_export_tensors(layer, prefix: str, quantized: dict, exporter, out_dtype) -> dict:
    """Quantized linears in the export layout; every other tensor of the layer (norms, biases,
    as the method left them) in the output dtype."""
    out = {}
    for name, q in quantized.items():
        out.update(exporter.linear_tensors(f"{prefix}.{name}", q))
    for pname, p in layer.state_dict().items():
        mod = pname.rsplit(".", 1)[0]
        if mod in quantized and pname.endswith(".weight"):
            continue
        out[f"{prefix}.{pname}"] = p.detach().to("cpu", out_dtype).contiguous()
    return out


def assemble(job: Job, layer_dir: Path, staged: Path, max_shard_bytes: int) -> None:
    """Final checkpoint: non-layer tensors from the source, layers from their files."""
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    source = job.source
    out_dtype = getattr(torch, job.settings.out_dtype)
    writer = ShardWriter(staged, max_shard_bytes)
    head = source.load(source.non_layer_names(), dtype=out_dtype)
    writer.add(dict(sorted(head.items())))
    del head
    for i in range(source.num_layers):
        writer.add(read_tensor_file(layer_dir / f"layer-{i:05d}.safetensors"))
    writer.finish()
    exporter = get_exporter(job.export_format)
    qcfg = exporter.quantization_config(
        bits=job.settings.bits, group_size=job.group_size,
        not_converted=list(job.arch.not_quantized), symmetric=job.settings.symmetric,
        act_order=bool(job.settings.method_options.get("act_order")))
    updates = {"quantization_config": qcfg, "torch_dtype": job.settings.out_dtype}
    if job.padded_intermediate:
        updates[job.arch.intermediate_key] = job.padded_intermediate
    write_config(source.path, staged, updates)
    copy_tokenizer(source.path, staged)
    (staged / "layerquant.json").write_text(json.dumps({
        "source": str(source.path.absolute()), "method": job.settings.method,
        "settings": job.settings.to_dict(), "group_size": job.group_size,
        "original_intermediate_size": job.intermediate, "notes": job.notes}, indent=2,
        default=str))


def _atomic_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _resolved(s: QuantSettings, group_size: int) -> QuantSettings:
    import copy
    r = copy.copy(s)
    r.group_size = group_size
    return r


def _relative_error(new: list, ref: list) -> float:
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(new, ref))
    den = sum(float(b.float().pow(2).sum()) for b in ref)
    return (num / max(den, 1e-30)) ** 0.5


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="layers", unit="layer", disable=not enabled)
