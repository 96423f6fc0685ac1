"""The planner's memory model: the bytes one decoder layer needs on a device (and on the host)
under a given set of decisions. Pure arithmetic on shapes; nothing is allocated.

Memory model (bytes; d = working dtype size, N×S calibration samples × tokens, H hidden):
  peak = max over the phases of one layer (calibrate / solve or search / propagate) of
         (sum of the phase's terms) × (1 + SLACK) + CUDA_CONTEXT.
  The terms are written out in plan/terms.py (those every method shares) and
  methods/<method>_memory.py (each method's own); layer_phases puts them together.

Host memory (`ram_peak` for GPU runs; on a host run the host IS the device and `device_peak` adds the
same host terms, HostFacts): the process itself, the model skeleton's embeddings and head,
the next layer read ahead as stored (an FP8 original is read at ~1 byte per weight and
dequantized on the device), hidden states and AWQ caches that wait in host RAM, parked or
host-side Hessians, the layer's export (its file is streamed, no serialised copy), and the
final assembly (the head in the output dtype, a shard and the bytes copy safetensors'
save_file makes of it)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..methods import awq_memory, gptq_memory
from ..stream.originals import original_format
from .shapes import InputGroup, ModelShapes, layer_groups, layer_kinds
from .sizes import MIB
from .terms import (CUDA_HOST, DEFAULT_SHARD, HOST_BASE_CPU, Decisions, HostFacts, LayerTerms,
                    Phase, PlanJob, Term, alive_copies)

# What the process holds outside torch's allocator: CUDA context, cuBLAS/cuSOLVER workspaces,
# loaded kernels. Measured by NVML's per-process query minus max reserved, H200, torch 2.11:
# 756 MiB (AWQ), 854 MiB (GPTQ, with its Triton solver) -- benchmarks/results/budget_h200_s4_*.json.
CUDA_CONTEXT = 900 * MIB
# Allocator fragmentation and small tensors nobody lists. Fitted on the same runs: max
# reserved / the terms' sum = 0.96 to 1.17 over AWQ and GPTQ at 7B and 70B width.
SLACK = 0.12
# What a run's process grows by after it is planned, outside any tensor the plan counts: the
# model family's transformers modules, the meta skeleton, tokenizer and allocator arenas.
IMPORT_MARGIN = 160 * MIB
# Each calibrated method's own terms (methods/<method>_memory.py); RTN has none.
# awq-gptq: GPTQ's Hessians and solve, and AWQ's scale search without its final rounding.
# (Modules or objects with codes_on_device, calibrate_phase, work_phases, final_phases and
# host_terms.)
METHOD_TERMS: dict[str, tuple[Any, ...]] = {
    "rtn": (), "awq": (awq_memory,), "gptq": (gptq_memory,),
    "awq-gptq": (gptq_memory, awq_memory.SMOOTH)}


@dataclass(frozen=True)
class Peak:
    total: int
    phase: str
    breakdown: tuple[tuple[str, int], ...]
    terms: tuple[Term, ...]


def layer_phases(job: PlanJob, groups: tuple[InputGroup, ...], extra: int,
                 dec: Decisions) -> list[Phase]:
    """The phases of one layer of this kind under `dec`, each with the terms alive in it."""
    parts = METHOD_TERMS[job.method]
    t = LayerTerms(job, groups, extra, dec, all(p.codes_on_device(dec) for p in parts))
    if not job.calibrated:
        return _rtn_phases(t)
    biggest = max(groups, key=lambda g: g.weight_elements(alive_copies(g, dec)))
    load, export = t.load(), t.export()
    phases = [(load[0], load[1] + t.held), t.propagate(t.resident(biggest, True)),
              (export[0], export[1] + t.held)]
    phases += [p.calibrate_phase(t, g) for g in groups for p in parts]
    phases += [ph for g in groups for p in parts for ph in p.work_phases(t, g)]
    return phases + [ph for p in parts for ph in p.final_phases(t)]


def _rtn_phases(t: LayerTerms) -> list[Phase]:
    """Round to nearest: each group quantized in place; with calibration samples the layer
    also propagates hidden states (for the output error)."""
    phases = [t.load()] + [(f"quantize {g.name}", t.resident(g, False) + t.codes
                            + [t.fp32_weight(g)]) for g in t.groups] + [t.export()]
    if not t.job.holds_hidden:
        return phases
    return [(p, terms + t.held) for p, terms in phases] + [t.propagate(t.whole)]


def layer_elements(groups, extra) -> int:
    return sum(g.weight_elements() for g in groups) + extra


def host_fixed(job: PlanJob) -> list[Term]:
    h = job.host
    return [Term("process", "the process: Python, torch, transformers"
                 + ("" if job.on_host else ", CUDA runtime"), h.base),
            Term("head", f"embeddings, head and final norm ({job.d}-byte)",
                 h.head_elements * job.d)]


def _stored(job: PlanJob, elements: int, what: str) -> Term:
    h = job.host
    label = f" ({h.stored_label})" if h.stored_label else ""
    return Term("staged", f"{what} as stored, {h.stored_per_weight:.2f} bytes/weight{label}",
                int(elements * h.stored_per_weight))


def _export_copy(job: PlanJob, elements: int) -> Term:
    """The layer's export in host RAM while it is propagated and written (the layer file is
    streamed tensor by tensor: measurements/atomic.py, no serialised copy)."""
    return Term("export", "the layer's export (packed codes, scales, norms)",
                int(elements * job.host.export_per_weight))


def _assemble(job: PlanJob) -> list[Term]:
    """The final assembly: the skeleton is still alive, the head is read again in the output
    dtype (float16), shards are written from RAM, one layer file is read back at a time."""
    h = job.host
    widest = max(layer_elements(*k) for k in job.kinds)
    layer_files, output = export_sizes(job)
    shard = min(max(h.max_shard, h.head_tensor * 2), output)
    return host_fixed(job) + [
        Term("export", "the head in float16 for the export", h.head_elements * 2),
        Term("export", "a shard being written and its serialised copy", 2 * shard),
        Term("export", "one layer file read back", int(widest * h.export_per_weight))]


def _host_phases(job: PlanJob, groups, extra, dec: Decisions, phases, assemble: bool = True):
    """A host run's phases with what the host holds beside the layer's work."""
    if not job.on_host:
        return phases
    elements = layer_elements(groups, extra)
    hidden = _hidden_on_host(job, dec) if dec.hidden == "cpu" else []
    fixed = host_fixed(job)
    export = _export_copy(job, elements)
    out = [(phase, fixed + terms + ([export] if phase.startswith("propagate") else []))
           for phase, terms in phases]
    out.append(("read the layer", fixed + hidden + [
        _stored(job, elements, "the layer"),
        Term("weights", f"layer weights ({job.d}-byte)", elements * job.d)]))
    out.append(("write the layer", fixed + hidden + [_export_copy(job, elements)]))
    if assemble:
        out.append(("assemble the export", _assemble(job)))
    return out


def device_peak(job: PlanJob, dec: Decisions, kinds=None, assemble: bool = True) -> Peak:
    """The device's peak over every phase of every layer kind (`kinds`: these only)."""
    best = None
    for groups, extra in (job.kinds if kinds is None else kinds):
        for phase, terms in _host_phases(job, groups, extra, dec,
                                         layer_phases(job, groups, extra, dec), assemble):
            raw = sum(t.bytes for t in terms)
            own = raw - sum(t.bytes for t in terms if t.kind == "process")
            total = raw + int(own * SLACK) + (0 if job.on_host else CUDA_CONTEXT)
            if best is None or total > best.total:
                best = Peak(total, phase, (), tuple(terms))
    assert best is not None  # _host_phases yields every phase of the run, at least one
    merged = _merged(best.terms)
    own = sum(t.bytes for t in best.terms if t.kind != "process")
    merged[f"allocator slack ({SLACK:.0%} of the tensors)"] = int(own * SLACK)
    if not job.on_host:
        merged["CUDA context"] = CUDA_CONTEXT
    return replace(best, breakdown=tuple(merged.items()))


def _merged(terms) -> dict[str, int]:
    merged: dict[str, int] = {}
    for t in terms:
        merged[t.label] = merged.get(t.label, 0) + t.bytes
    return merged


def ram_peak(job: PlanJob, dec: Decisions, kinds=None, assemble: bool = True
             ) -> tuple[int, str, tuple[tuple[str, int], ...]]:
    """Host memory of a GPU configuration (a host 'device' is planned by `device_peak` itself): the
    largest phase's (total, phase, ((label, bytes), ...))."""
    widest = max(layer_elements(*k) for k in job.kinds)
    fixed = host_fixed(job)
    staged = [_stored(job, widest, "the next layer read ahead")] if job.host.prefetch else []
    phases: list[Phase] = []
    for groups, extra in (job.kinds if kinds is None else kinds):
        held = _hidden_on_host(job, dec)
        work = held + [t for p in METHOD_TERMS[job.method]
                       for t in p.host_terms(job, groups, dec)]
        kind = "MoE layer" if any(g.copies > 1 for g in groups) else "dense layer"
        phases.append((f"quantize a {kind}", fixed + staged + work))
        phases.append((f"write a {kind}", fixed + staged + held + [
            _export_copy(job, layer_elements(groups, extra))]))
    if assemble:
        phases.append(("assemble the export", _assemble(job)))
    phase, terms = max(phases, key=lambda p: sum(t.bytes for t in p[1]))
    merged = _merged(terms)
    return sum(merged.values()), phase, tuple(merged.items())


def _hidden_on_host(job: PlanJob, dec: Decisions) -> list[Term]:
    """Hidden states waiting in host RAM, or the chunks in use of those on disk."""
    d, N, S, H = job.d, job.samples, job.seqlen, job.shapes.hidden
    if job.holds_hidden and dec.hidden == "cpu":
        return [Term("hidden", f"hidden states in+out {N}×{S}×{H}", 2 * N * S * H * d)]
    if job.holds_hidden and dec.hidden == "disk":
        return [Term("hidden", "hidden-state chunks in use (2 mapped, 2 staged)",
                     4 * dec.chunk * S * H * d)]
    return []


def make_job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host, forced, arch,
             host: HostFacts | None = None):
    kinds = []
    for moe in layer_kinds(shapes):
        groups = layer_groups(shapes, moe, arch)
        extra = shapes.hidden * (shapes.num_experts + (1 if shapes.shared_expert_intermediate
                                                         else 0)) if moe else 0  # routers
        kinds.append((groups, extra))
    if host is None:
        host = default_host(shapes, dtype_bytes, on_host)
    return PlanJob(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host,
                   tuple(kinds), forced, host)


def head_elements(shapes: ModelShapes) -> tuple[int, int]:
    """(elements of embeddings + head + final norm, elements of the largest one)."""
    table = shapes.vocab * shapes.hidden
    return table * (1 if shapes.tied_embeddings else 2) + shapes.hidden, table


def export_bytes_per_weight(bits: float, group_size: int) -> float:
    """Bytes per weight of a packed export: codes, an fp16 scale and a packed zero per group
    (per output channel when group_size is -1, counted as one group of 4096)."""
    g = group_size if group_size and group_size > 0 else 4096
    return bits / 8 + 2 / g + bits / 8 / g


def host_facts(shapes: ModelShapes, dtype_bytes: int, on_host: bool, config: dict | None = None,
               bits: float = 4, group_size: int = 128, max_shard: int = DEFAULT_SHARD,
               base: int | None = None, save_hidden: bool = False) -> HostFacts:
    """HostFacts of a run: the checkpoint's stored bytes per weight from its config (a
    quantized original's format, else its dtype), the export's from bits and group size."""
    stored, label = float(dtype_bytes), ""
    if config is not None:
        fmt = original_format(config, {})
        if fmt is not None:
            stored, label = fmt.bytes_per_weight(), fmt.label
        else:
            name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
            stored = {"float32": 4.0, "float64": 8.0}.get(name, 2.0)
    elements, largest = head_elements(shapes)
    if base is None:
        base = HOST_BASE_CPU + (0 if on_host else CUDA_HOST)
    return HostFacts(base=base, head_elements=elements, head_tensor=largest,
                     stored_per_weight=stored,
                     export_per_weight=export_bytes_per_weight(bits, group_size),
                     max_shard=max_shard, prefetch=not on_host, save_hidden=save_hidden,
                     stored_label=label)


def default_host(shapes: ModelShapes, dtype_bytes: int, on_host: bool) -> HostFacts:
    """HostFacts from the shapes alone: a float checkpoint in the working dtype, 4-bit g128."""
    elements, largest = head_elements(shapes)
    return HostFacts(base=HOST_BASE_CPU + (0 if on_host else CUDA_HOST),
                     head_elements=elements, head_tensor=largest,
                     stored_per_weight=float(dtype_bytes), prefetch=not on_host)


def export_sizes(job: PlanJob) -> tuple[int, int]:
    """(bytes of every layer's file, bytes of the whole export with the float16 head)."""
    s, h = job.shapes, job.host
    counts = {False: s.layers - s.moe_layers, True: s.moe_layers}
    layers = 0
    for groups, extra in job.kinds:
        moe = any(g.copies > 1 for g in groups)
        layers += counts[moe] * layer_elements(groups, extra)
    layer_files = int(layers * h.export_per_weight)
    return layer_files, layer_files + h.head_elements * 2


def disk_needs(job: PlanJob, dec: Decisions) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Disk a run needs beside the checkpoint: hidden states when they wait on disk (the
    inputs, the float layer's outputs and the quantized outputs: three copies while a layer
    propagates), every finished layer's file in the job directory, and the staged export (the
    job's layer files are deleted only once the export is published, so both coexist)."""
    s = job.shapes
    layer_files, output = export_sizes(job)
    items = []
    hidden = 0
    if job.holds_hidden and dec.hidden == "disk":
        hidden = 3 * job.samples * job.seqlen * s.hidden * job.d
        items.append(("hidden states (inputs, float and quantized outputs)", hidden))
    elif job.holds_hidden and job.on_host and job.host.save_hidden:
        hidden = job.samples * job.seqlen * s.hidden * job.d
        items.append(("hidden states saved for resume", hidden))
    items.append(("job directory: every layer's file", layer_files))
    items.append(("the export (layers + head in float16)", output))
    return max(hidden + layer_files, layer_files + output), tuple(items)
