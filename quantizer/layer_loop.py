"""One pass over the decoder layers, resumable: for each layer load -> calibrate -> quantize ->
write (durably) -> propagate -> free.

Propagation runs the layer rebuilt *from the tensors just written* (the exported integer codes,
fp16 scales and norms), never from in-memory float values. So the hidden states entering the
next layer are exactly what a resumed run reconstructs by replaying finished layers from their
files, and a resumed run produces byte-identical output."""
from __future__ import annotations

import time
from dataclasses import asdict

import torch

from .distributed import world
from .layer_context import LayerContext
from .memory import MemoryMeter
from .moe import ExpertCoverage
from .report import LayerRecord
from .shards import CalibLayout, agree_min, fold_values
from .skeleton import (build_skeleton, capture_layer0_inputs, load_layer, pad_mlp,
                       release_layer, to_device)

STAGE = "quantize"


class LayerLoop:
    def __init__(self, job, method, exporter, jobdir, tokens, progress: bool, say):
        self.job, self.method, self.exporter, self.jobdir = job, method, exporter, jobdir
        self.say = say
        s = job.settings
        self.model = build_skeleton(job.source, "cpu", job.dtype, job.padded_intermediate)
        self.hidden_dev = torch.device("cpu" if s.hidden_device == "auto" else s.hidden_device)
        self.out_dtype = getattr(torch, s.out_dtype)
        self.progress = progress
        self.inputs, self.kwargs = [], {}
        self.world = world()
        self.layout = None
        if tokens is not None:
            # This process's calibration chunks: its shards' samples (all of them when alone),
            # cut with one chunk size for all ranks (sums within a shard follow the chunks)
            s.chunk_size = agree_min(self.world, s.chunk_size)
            self.layout = CalibLayout.plan(len(tokens), s.chunk_size, s.calib.shards,
                                           self.world)
            _, kwargs = capture_layer0_inputs(self.model, tokens[:1])
            embed = self.model.get_input_embeddings()
            self.inputs = [embed(tokens[a:b]).to(self.hidden_dev)
                           for a, b in zip(self.layout.sample_start, self.layout.sample_end)]
            self.kwargs = to_device(kwargs, job.device, job.dtype)
        hidden_bytes = sum(t.numel() * t.element_size() for t in self.inputs)
        # auto: on a GPU replaying finished layers (one forward each) costs less than writing
        # every layer's hidden states to disk; on the CPU it is the other way round.
        self.save_hidden = {"always": True, "never": False}.get(
            s.save_hidden, job.device.type == "cpu" and hidden_bytes <= s.save_hidden_max_bytes)
        if self.world.distributed:  # each rank holds only its shards: resume replays instead
            self.save_hidden = False
        self._prefetch = None  # (index, future) of the next layer's tensors being read

    @staticmethod
    def records(jobdir) -> list[LayerRecord]:
        """The per-layer records of a finished pass, from the job directory."""
        return [LayerRecord(**jobdir.layer_meta(STAGE, i)["record"])
                for i in range(jobdir.next_layer(STAGE))]

    # ---- the pass --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> list[LayerRecord]:
        from tqdm.auto import tqdm

        n = self.job.source.num_layers
        start = self.jobdir.next_layer(STAGE)
        records = self.records(self.jobdir)
        if start and self.inputs:
            self._restore_inputs(start)
        bar = tqdm(total=n, initial=start, desc="layers", unit="layer",
                   disable=not (self.progress and self.world.main))
        for i in range(start, n):
            records.append(self._layer(i))
            bar.set_postfix_str(f"err {records[-1].error_str()}")
            bar.update(1)
        bar.close()
        return records

    def _layer(self, i: int) -> LayerRecord:
        job = self.job
        meter = MemoryMeter(job.device)
        meter.reset()
        t0 = time.perf_counter()
        layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                           job.padded_intermediate, tensors=self._read(i))
        self._start_read(i + 1)
        t_load = time.perf_counter() - t0
        ctx = LayerContext(i, layer, job.arch, self.model.config, job.resolved_settings(),
                           self.inputs, self.kwargs, job.device, job.dtype, log=self.say,
                           layout=self.layout)
        # MoE: the float pass also counts tokens per expert; the method then gets this
        # layer's own linears, less the experts that saw too few tokens (rounded after).
        coverage = ExpertCoverage(layer, job.arch, self.model.config, i,
                                  job.settings.min_expert_tokens, bool(self.inputs))
        with coverage:
            fp_out = ctx.outputs() if self.inputs else None
        coverage.sum_over_ranks(world())
        ctx.arch = coverage.layer_arch()
        t1 = time.perf_counter()
        quantized = self.method.quantize_layer(ctx)
        coverage.quantize_fallbacks(ctx, quantized, self.say,
                                    getattr(self.method, "module_settings", None))
        t_quant = time.perf_counter() - t1
        w_err = self._weight_errors(i, quantized, ctx)
        tensors = export_tensors(layer, job.arch.layer_prefix(i), quantized, self.exporter,
                                 self.out_dtype)
        out_err = None
        if self.inputs:
            materialise(layer, job.arch.layer_prefix(i), tensors, self.exporter)
            new = ctx.outputs()
            out_err = _rel_chunks(new, fp_out, self.layout)
            self.inputs = new
        release_layer(self.model, i)
        t2 = time.perf_counter()
        record = LayerRecord(index=i, weight_error=max(w_err.values()), output_error=out_err,
                             seconds=0.0, load_s=t_load, quantize_s=t_quant,
                             peak_bytes=meter.peak(), stats=_numbers(ctx.stats))
        self.jobdir.save_layer(STAGE, i, tensors, meta={"record": asdict(record)})
        if self.save_hidden and self.inputs and i + 1 < job.source.num_layers:
            self.jobdir.save_hidden(i + 1, self.inputs)
        record.write_s = time.perf_counter() - t2
        record.seconds = time.perf_counter() - t0
        self.jobdir.commit_layer(STAGE, i)
        return record

    def _read(self, i: int) -> dict:
        """Layer i's tensors (host memory), from the read started while layer i-1 worked."""
        if self._prefetch is not None and self._prefetch[0] == i:
            tensors = self._prefetch[1].result()
            self._prefetch = None
            return tensors
        return self.job.source.load(self.job.source.layer_names(i))

    def _start_read(self, i: int) -> None:
        """Read the next layer from disk on a background thread while this one is quantized
        on the GPU (safetensors copies outside the GIL); costs one more layer of host memory.
        Not on CPU runs: there the compute is the bottleneck, and a second allocating thread
        grows the host footprint (a second malloc arena holds its own high-water mark)."""
        if i >= self.job.source.num_layers or self.job.device.type != "cuda":
            return
        from concurrent.futures import ThreadPoolExecutor
        if not hasattr(self, "_reader"):
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._prefetch = (i, self._reader.submit(self.job.source.load,
                                                 self.job.source.layer_names(i)))

    def _weight_errors(self, i: int, quantized: dict, ctx) -> dict[str, float]:
        """||W - Wq|| / ||W|| against the weight the method quantized: the layer's own (AWQ
        has scaled it), or the checkpoint's where the method already swapped in the quantized
        value (GPTQ's true-sequential updates), read one tensor at a time."""
        job = self.job
        prefix = job.arch.layer_prefix(i)
        errors = {}
        for name, q in quantized.items():
            if name not in ctx.replaced:
                w = ctx.module(name).weight
                errors[name] = _rel(q.dequantize().to(w.device), w)
                continue
            known = ctx.stats.get("modules", {}).get(name, {}).get("weight_error")
            if known is not None:  # the method measured it before replacing the weight
                errors[name] = float(known)
                continue
            key = f"{prefix}.{name}.weight"
            w = job.source.load([key], device=job.device, dtype=torch.float32,
                                check_finite=False)
            pad_mlp(w, job.arch, prefix, job.padded_intermediate or 0)
            errors[name] = _rel(q.dequantize().to(job.device), w[key])
        return errors

    # ---- resume ----------------------------------------------------------------------------
    def _restore_inputs(self, start: int) -> None:
        """Hidden states entering layer `start`: from the job directory when saved, else by
        replaying the finished layers from their files (same code path as the first run)."""
        if not self.world.distributed and self.jobdir.has_hidden(start, STAGE):
            self.inputs = [t.to(self.hidden_dev) for t in self.jobdir.load_hidden(start, STAGE)]
            self.say(f"resumed at layer {start} from saved hidden states")
            return
        job = self.job
        for i in range(start):
            tensors, _ = self.jobdir.load_layer(STAGE, i)
            layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                               job.padded_intermediate)
            materialise(layer, job.arch.layer_prefix(i), tensors, self.exporter)
            ctx = LayerContext(i, layer, job.arch, self.model.config, job.resolved_settings(),
                               self.inputs, self.kwargs, job.device, job.dtype,
                               layout=self.layout)
            self.inputs = ctx.outputs()
            release_layer(self.model, i)
        self.say(f"resumed at layer {start} by replaying {start} finished layers")


def export_tensors(layer, prefix: str, quantized: dict, exporter, out_dtype) -> dict:
    """Quantized linears in the export layout; every other tensor of the layer (norms, biases,
    as the method left them) in the output dtype."""
    out = {}
    for name, q in quantized.items():
        out.update(exporter.linear_tensors(f"{prefix}.{name}", q))
    for pname, p in layer.state_dict().items():
        if pname.rsplit(".", 1)[0] in quantized and pname.endswith(".weight"):
            continue
        out[f"{prefix}.{pname}"] = p.detach().to("cpu", out_dtype).contiguous()
    return out


@torch.no_grad()
def materialise(layer, prefix: str, tensors: dict, exporter) -> None:
    """Set the layer's float parameters to exactly what the export holds: a weight that is not
    stored as a float tensor is a quantized linear, dequantized from its packed form."""
    for pname, p in layer.named_parameters():
        key = f"{prefix}.{pname}"
        if key in tensors:
            p.data = tensors[key].to(p.device, p.dtype)
        else:
            q = exporter.linear_from_tensors(key[:-len(".weight")], tensors)
            p.data = q.dequantize(torch.float32).to(p.device, p.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _rel_chunks(new: list, ref: list, layout) -> float:
    """Relative output error over every rank's chunks (shard sums, folded in order)."""
    num, den = {}, {}
    for k, (a, b) in enumerate(zip(new, ref)):
        s = layout.shard_of[k]
        num[s] = num.get(s, 0.0) + float((a.float() - b.float()).pow(2).sum())
        den[s] = den.get(s, 0.0) + float(b.float().pow(2).sum())
    num, den = fold_values(layout, num), fold_values(layout, den)
    return (num / max(den, 1e-30)) ** 0.5


def _numbers(stats: dict, prefix: str = "") -> dict:
    """The numeric leaves of a method's stats (JSON-friendly, flattened)."""
    out = {}
    for k, v in stats.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
        elif isinstance(v, str):
            out[key] = v
    return out
