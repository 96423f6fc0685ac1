"""One pass over the decoder layers, resumable: for each layer load -> calibrate -> quantize ->
write (durably) -> propagate -> free.

Propagation runs the layer rebuilt *from the tensors just written* (the exported integer codes,
fp16 scales and norms), never from in-memory float values. So the hidden states entering the
next layer are exactly what a resumed run reconstructs by replaying finished layers from their
files, and a resumed run produces byte-identical output."""
from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from quantizer.kernels.packing import QuantizedWeight

from ..errors import OutOfMemory
from ..export.store import (DirectJobStore, DirectStore, LayerFileStore, float_tensors,
                            layer_records, plan_layout, use_direct_shards)
from ..parallel.distributed import world
from ..parallel.shards import CalibLayout, agree_min, fold_values
from ..plan.planner import shrink
from ..plan.terms import Decisions
from ..stream.hidden_store import Chunks, HiddenStore
from ..stream.skeleton import (build_skeleton, capture_layer_inputs, embed_inputs, kwargs_to_device,
                               load_layer, pad_mlp, release_layer)
from .meter import MemoryMeter
from .oom import free_memory, injection_plan, is_oom, maybe_inject, shrink_local
from .expert_coverage import ExpertCoverage
from .job import layer_decisions, local_decisions
from .report import LayerRecord

STAGE = "quantize"
log = logging.getLogger(__name__)


class LayerLoop:
    def __init__(self, job, method, exporter, jobdir, tokens, progress: bool):
        self.job, self.method, self.exporter, self.jobdir = job, method, exporter, jobdir
        s = job.settings
        self.world = world()
        # (index, future) of the next layer's tensors being read
        self._prefetch: tuple[int, Future] | None = None
        if exporter is not None:  # the first layer is read while the loop is set up
            self._start_read(jobdir.next_layer(STAGE))
        self.model = job.take_skeleton() or build_skeleton(job.source, "cpu", job.dtype,
                                                           job.padded_intermediate)
        # Without a plan (CPU runs) the settings say where hidden states wait; OOM recovery
        # replaces the job's plan (or these) with smaller decisions.
        self._local = local_decisions(s, job.device)
        self.plan = job.plan  # this pass's plan (OOM recovery replaces it)
        self.hidden = HiddenStore(job.device, jobdir.path / "hidden")
        # where plain lists of hidden states go (the measurement pass keeps them in memory)
        self.hidden_dev = torch.device(job.device if self.decisions(0).hidden == "gpu"
                                       else "cpu")
        self.out_dtype = getattr(torch, s.out_dtype)
        self.progress = progress
        self.inputs, self.kwargs = Chunks(), []
        self.inject = injection_plan()
        self.layout: CalibLayout | None = None
        if tokens is not None:
            dec = self.decisions(0)
            # This process's calibration chunks: its shards' samples (all of them when alone),
            # cut with one chunk size for all ranks; a chunk never crosses a shard
            chunk = agree_min(self.world, dec.chunk)
            self.layout = CalibLayout.plan(len(tokens), chunk, s.calib.shards, self.world)
            # per layer: sliding and full attention layers get different masks
            _, calls = capture_layer_inputs(self.model, tokens[:1])
            self.inputs = self.hidden.new(dec.hidden)
            for a, b in zip(self.layout.sample_start, self.layout.sample_end):
                self.hidden.append(self.inputs, embed_inputs(self.model, tokens[a:b]))
            self.kwargs = kwargs_to_device(calls, job.device, job.dtype)
        hidden_bytes = sum(t.numel() * t.element_size() for t in self.inputs)
        # auto: on a GPU replaying finished layers (one forward each) costs less than writing
        # every layer's hidden states to disk; on the CPU it is the other way round.
        # (Not when the memory plan sent them to disk for want of RAM: saving serialises a
        # copy in memory.)
        self.save_hidden = {"always": True, "never": False}.get(
            s.save_hidden, job.device.type == "cpu" and hidden_bytes <= s.save_hidden_max_bytes
            and not (self.plan is not None and self.decisions(0).hidden == "disk"))
        if self.world.distributed:  # each rank holds only its shards: resume replays instead
            self.save_hidden = False
        self._pending: list[Chunks] = []  # hidden states the current attempt is writing
        # one thread: the store's set-up, then each layer's write + commit
        self._writer: ThreadPoolExecutor | None = None
        self._write: Future | None = None  # the future of the last task given to it
        self._async_write = False
        # the quantize pass's (the measurement pass, a subclass, exports nothing)
        self.layer_store = (self._open_store(getattr(job, "max_shard_bytes", 1 << 30))
                            if exporter is not None else None)

    # ---- where finished layers go ----------------------------------------------------------
    def _open_store(self, max_shard_bytes: int):
        """The export's shard files written in place (export/store.py), or layer files for a
        job that has them. GPU runs write on a thread: layer i's bytes go to disk and are
        committed while layer i+1 is quantized (not when hidden states are saved too: those
        must be durable before the commit, so that whole step stays in line)."""
        if not use_direct_shards(self.jobdir):
            self._async_write = False
            return LayerFileStore(self.jobdir)
        layout = plan_layout(self.job, self.model, self.exporter, self.method, max_shard_bytes)
        store = DirectJobStore(self.jobdir, layout)
        self._async_write = self.world.main and not self.save_hidden and (
            self.job.device.type == "cuda" or os.environ.get("LAYERQUANT_ASYNC_WRITE") == "1")
        if not self.world.main:
            return store  # ranks > 0 only read (resume replays), once rank 0 created it
        fresh = not DirectStore.present(self.jobdir.path)
        if not fresh:
            store.attach()  # a resumed job's files are checked before any work
        self._submit(lambda: self._prepare_store(store, fresh))
        return store

    def _prepare_store(self, store, fresh: bool) -> None:
        """New shard files, then the non-layer tensors (on the writer thread on GPUs: beside
        the first layer's work)."""
        if fresh:
            store.create()
        if not store.head_written():
            store.write_head(self.job.source)

    def _submit(self, fn) -> None:
        """Run fn after every earlier task: on the writer thread for GPU runs, else now."""
        if not self._async_write:
            fn()
            return
        self.wait_writes()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-write")
        self._write = self._writer.submit(fn)

    def wait_writes(self) -> None:
        """Block until every task given to the writer is done (its error raised here)."""
        if self._write is not None:
            future, self._write = self._write, None
            future.result()

    def _save_layer(self, i: int, tensors: dict, meta: dict) -> None:
        """Layer i durable, then committed in state.json (hidden states saved in between)."""
        if not self.world.main:
            return
        store = self.layer_store
        assert store is not None  # the quantize pass writes its layers to a store
        if self._async_write:  # the bytes leave the GPU here, the thread writes them
            tensors = {k: v.to("cpu") for k, v in tensors.items()}
        hidden = (list(self.inputs) if self.save_hidden and self.inputs
                  and i + 1 < self.job.source.num_layers else None)

        def save():
            store.save_layer(i, tensors, meta)
            if hidden is not None:
                self.jobdir.save_hidden(i + 1, hidden)
            store.commit(i)

        self._submit(save)

    def layer_kwargs(self, i: int) -> dict:
        """What transformers' forward passes decoder layer i besides its hidden states."""
        return self.kwargs[i] if self.kwargs else {}

    def decisions(self, i: int) -> Decisions:
        return layer_decisions(self.plan, i, self._local)

    @staticmethod
    def records(jobdir) -> list[LayerRecord]:
        """The per-layer records of a finished pass, from the job directory."""
        return [LayerRecord(**meta["record"]) for meta in layer_records(jobdir)]

    # ---- the pass --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> list[LayerRecord]:
        n = self.job.source.num_layers
        start = self.jobdir.next_layer(STAGE)
        records = self.records(self.jobdir)
        if start and self.inputs:
            self._restore_inputs(start)
        bar = tqdm(total=n, initial=start, desc="layers", unit="layer",
                   disable=not (self.progress and self.world.main))
        try:
            for i in range(start, n):
                records.append(self._layer(i))
                bar.set_postfix_str(f"err {records[-1].error_str()}")
                bar.update(1)
        except BaseException:
            # The layer being written when this broke is still committed (or fails cleanly)
            # before the job directory is unlocked; this error is the one that counts.
            try:
                self.wait_writes()
            except Exception:  # noqa: BLE001
                pass
            raise
        self.wait_writes()
        bar.close()
        self.hidden.release(self.inputs)
        return records

    def _layer(self, i: int) -> LayerRecord:
        """Layer i, retried after an out-of-memory error with smaller decisions (plan.shrink:
        first what cannot change the output, then a halved chunk, then the rest; without a
        plan: halved chunk, then hidden states to disk) until it fits or nothing is left to
        shrink (OutOfMemory; finished layers stay committed for --resume). A retry redoes the
        layer from its inputs, which the failed attempt never replaced; every statistic is
        summed one sample at a time, so the chunk size does not change the numbers."""
        retries: list[str] = []
        while True:
            dec = self.decisions(i)
            if self.inputs:
                layout = self._calib_layout()
                if any(b - a > dec.chunk for a, b in zip(layout.sample_start,
                                                          layout.sample_end)):
                    self.layout = layout.split(dec.chunk)  # the chunks' shards follow
                self.inputs = self.hidden.move(self.hidden.rechunk(self.inputs, dec.chunk),
                                              dec.hidden)
            try:
                return self._attempt(i, dec, retries)
            except BaseException as e:
                # Several processes: the others would wait for this one in a collective, so
                # an OOM ends the run (finished layers stay committed for --resume).
                if not is_oom(e) or self.world.distributed:
                    raise
                reason = f"{type(e).__name__} at {_our_frame(e)}: {str(e).splitlines()[0][:200]}"
            # Outside the handler: the traceback (and every tensor its frames held) is gone.
            release_layer(self.model, i)
            for chunks in self._pending:
                self.hidden.release(chunks)
            self._pending.clear()
            self._prefetch = None
            free_memory(self.job.device)
            step = self._shrink(i, dec, reason)
            retries.append(f"{reason} -> {step}")
            log.warning("layer %d: out of memory (%s); retrying with %s", i, reason, step)

    def _shrink(self, i: int, dec: Decisions, reason: str) -> str:
        if self.plan is not None:
            self.plan = shrink(self.plan, i, self.job.arch)  # OutOfMemory when none is left
            new = self.plan.decisions_for(i)
            return f"{self.plan.device_plan_for(i).steps[-1]} ({new.describe()})"
        moved = shrink_local(dec)
        if moved is None:
            raise OutOfMemory(f"layer {i} ran out of memory at chunk 1 with hidden states "
                              f"on disk: nothing left to shrink ({reason}); finished layers "
                              f"are kept: rerun with --resume after freeing memory")
        self._local = moved[0]
        return f"{moved[1]} ({moved[0].describe()})"

    def _attempt(self, i: int, dec: Decisions, retries: list[str]) -> LayerRecord:
        """One try at layer i: load, float pass, quantize, export, propagate, save."""
        job = self.job
        meter = MemoryMeter(job.device)
        meter.reset()
        t0 = time.perf_counter()
        layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                           job.padded_intermediate, tensors=self._read(i))
        self._start_read(i + 1)
        t_load = time.perf_counter() - t0
        ctx = job.layer_context(i, layer, self.model.config, self.inputs, self.layer_kwargs(i),
                                layout=self.layout, decisions=dec)
        fp_out, coverage = self._float_pass(ctx, layer, i, dec)
        tensors, w_err, t_quant = self._quantize_and_export(ctx, coverage, layer, i,
                                                            len(retries))
        out_err = None
        if self.inputs:
            out_err = self._propagate_written(ctx, layer, i, tensors, fp_out, dec)
        release_layer(self.model, i)
        peak = meter.peak()
        t2 = time.perf_counter()
        predicted = (self.plan.device_plan_for(i).predicted_peak
                     if self.plan is not None else None)
        record = LayerRecord(index=i, weight_error=max(w_err.values()), output_error=out_err,
                             seconds=0.0, load_s=t_load, quantize_s=t_quant,
                             peak_bytes=peak, stats=_numbers(ctx.stats),
                             predicted_peak=predicted, decisions=dec.describe(),
                             oom_retries=list(retries))
        record.seconds = time.perf_counter() - t0  # so far: the saved record has a time too
        self._save_layer(i, tensors, {"record": asdict(record)})
        record.write_s = time.perf_counter() - t2
        record.seconds = time.perf_counter() - t0
        if job.device.type == "cuda":
            torch.cuda.empty_cache()  # the next layer's sizes start from a clean cache
        return record

    def _float_pass(self, ctx, layer, i: int, dec: Decisions
                    ) -> tuple[Chunks | None, ExpertCoverage]:
        """The float layer's outputs (None without inputs). MoE: the pass also counts tokens
        per expert; the method then gets this layer's own linears, less the experts that saw
        too few tokens (rounded after, by the coverage returned)."""
        job = self.job
        coverage = ExpertCoverage(layer, job.arch, self.model.config, i,
                                  job.settings.min_expert_tokens, bool(self.inputs))
        with coverage:
            fp_out = self._forward_all(ctx, dec) if self.inputs else None
        ctx.mark("float forward")
        coverage.sum_over_ranks(self.world)
        ctx.arch = coverage.layer_arch()
        ctx.expert_tokens = coverage.counts
        return fp_out, coverage

    def _quantize_and_export(self, ctx, coverage: ExpertCoverage, layer, i: int, attempt: int):
        """(the layer's export tensors, weight error per linear, seconds quantizing)."""
        t1 = time.perf_counter()
        quantized = self.method.quantize_layer(ctx)
        coverage.quantize_fallbacks(ctx, quantized,
                                    getattr(self.method, "module_settings", None))
        t_quant = time.perf_counter() - t1
        maybe_inject(self.inject, i, attempt)
        w_err = self._weight_errors(i, quantized, ctx)
        # the codes (a byte per weight) go into `tensors`, in host RAM
        tensors = export_tensors(layer, self.job.arch.layer_prefix(i), quantized, self.exporter,
                                 self.out_dtype)
        return tensors, w_err, t_quant

    def _propagate_written(self, ctx, layer, i: int, tensors, fp_out, dec: Decisions) -> float:
        """The layer rebuilt from the tensors just written runs every chunk: its outputs are
        the next layer's inputs; returns their error against the float outputs."""
        materialise(layer, self.job.arch.layer_prefix(i), tensors, self.exporter)
        ctx.mark("export")
        new, out_err = self._propagate(ctx, fp_out, dec)
        ctx.mark("propagate")
        self.hidden.release(fp_out)
        self.hidden.release(self.inputs)
        self.inputs = new
        self._pending.clear()
        return out_err

    def _forward_all(self, ctx, dec: Decisions) -> Chunks:
        """The float layer's output for every chunk (the reference for the output error)."""
        out = self.hidden.new(dec.hidden)
        self._pending.append(out)
        for x in ctx.chunks():
            self.hidden.append(out, ctx.forward(x))
        return out

    def _propagate(self, ctx, reference: Chunks, dec: Decisions) -> tuple[Chunks, float]:
        """The quantized layer's outputs (the next layer's inputs) and their relative error
        against `reference` over every rank's chunks (shard sums, folded in shard order);
        the reference's chunks are let go as they are compared."""
        new = self.hidden.new(dec.hidden)
        self._pending.append(new)
        num: dict[int, float] = {}
        den: dict[int, float] = {}
        layout = self._calib_layout()
        for k, x in enumerate(ctx.chunks()):
            y = ctx.forward(x)
            ref = reference[k].to(y.device, non_blocking=True).float()
            s = layout.shard_of[k]
            num[s] = num.get(s, 0.0) + float((y.float() - ref).pow(2).sum())
            den[s] = den.get(s, 0.0) + float(ref.pow(2).sum())
            del ref
            reference[k] = None
            self.hidden.append(new, y)
        total_num, total_den = fold_values(layout, num), fold_values(layout, den)
        return new, (total_num / max(total_den, 1e-30)) ** 0.5

    def _calib_layout(self) -> CalibLayout:
        """The calibration chunks' layout, which every run with calibration tokens has."""
        if self.layout is None:
            raise RuntimeError("internal: no calibration layout in a run without calibration")
        return self.layout

    def _read(self, i: int) -> dict:
        """Layer i's tensors (host memory), from the read started while layer i-1 worked."""
        if self._prefetch is not None and self._prefetch[0] == i:
            tensors = self._prefetch[1].result()
            self._prefetch = None
            return tensors
        return self.job.source.load_stored(self.job.source.layer_names(i))

    def _start_read(self, i: int) -> None:
        """Read the next layer from disk on a background thread while this one is quantized
        on the GPU (safetensors copies outside the GIL); costs one more layer of host memory.
        Not on CPU runs: there the compute is the bottleneck, and a second allocating thread
        grows the host footprint (a second malloc arena holds its own high-water mark)."""
        if i >= self.job.source.num_layers or self.job.device.type != "cuda":
            return
        if not hasattr(self, "_reader"):
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._prefetch = (i, self._reader.submit(self.job.source.load_stored,
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
                errors[name] = _rel(q, ctx.module(name).weight)
                continue
            known = ctx.stats.get("modules", {}).get(name, {}).get("weight_error")
            if known is not None:  # the method measured it before replacing the weight
                errors[name] = float(known)
                continue
            key = f"{prefix}.{name}.weight"
            w = job.source.load([key], device="cpu", dtype=torch.float32, check_finite=False)
            pad_mlp(w, job.arch, prefix, job.padded_intermediate or 0)
            errors[name] = _rel(q, w[key])
        return errors

    # ---- resume ----------------------------------------------------------------------------
    def _restore_inputs(self, start: int) -> None:
        """Hidden states entering layer `start`: from the job directory when saved, else by
        replaying the finished layers from their files (same code path as the first run)."""
        where = self.decisions(start).hidden
        if not self.world.distributed and self.jobdir.has_hidden(start, STAGE):
            self.inputs = self.hidden.move(self.jobdir.load_hidden(start, STAGE), where)
            log.info("resumed at layer %d from saved hidden states", start)
            return
        job = self.job
        self.wait_writes()  # the store is checked before anything is read from it
        assert self.layer_store is not None  # the quantize pass has one
        for i in range(start):
            tensors = self.layer_store.load_layer(i)
            layer = load_layer(self.model, job.source, i, job.device, job.dtype,
                               job.padded_intermediate)
            materialise(layer, job.arch.layer_prefix(i), tensors, self.exporter)
            ctx = job.layer_context(i, layer, self.model.config, self.inputs, self.layer_kwargs(i),
                                    layout=self.layout)
            new = self._forward_all(ctx, self.decisions(i))
            self.hidden.release(self.inputs)
            self.inputs = new
            self._pending.clear()
            release_layer(self.model, i)
        log.info("resumed at layer %d by replaying %d finished layers", start, start)


def export_tensors(layer, prefix: str, quantized: dict, exporter, out_dtype) -> dict:
    """Quantized linears in the export layout; every other tensor of the layer (norms, biases,
    as the method left them) in the output dtype."""
    out = {}
    for name, q in quantized.items():
        out.update(exporter.linear_tensors(f"{prefix}.{name}", q))
    out.update(float_tensors(layer, prefix, quantized, out_dtype))
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
            p.data = q.dequantize_to(torch.empty_like(p.data))


def _rel(q: QuantizedWeight, w: torch.Tensor) -> float:
    """||dequantize(q) - w|| / ||w||, a slice of rows at a time on q's device (w may be in
    host RAM): float32 copies of a whole wide weight would not fit a small budget."""
    num = den = 0.0
    for r0, r1 in q.row_steps():
        ws = w[r0:r1].to(q.codes.device, torch.float32)
        num += float((q.rows(r0, r1).dequantize() - ws).square().sum(dtype=torch.float64))
        den += float(ws.square().sum(dtype=torch.float64))
    return (num ** 0.5) / max(den ** 0.5, 1e-12)


def _our_frame(e: BaseException) -> str:
    """file:line (function) of the innermost frame of this package in e's traceback: which
    allocation the memory model missed, for the report."""
    ours = [f for f in traceback.extract_tb(e.__traceback__)
            if "/quantizer/" in f.filename.replace("\\", "/")]
    if not ours:
        return "?"
    f = ours[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"


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
