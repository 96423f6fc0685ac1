"""The planner's memory model: the bytes one decoder layer needs on a device (and on the host)
under a given set of decisions. Pure arithmetic on shapes; nothing is allocated.

Memory model (bytes; d = working dtype size, N×S calibration samples × tokens, H hidden):
  peak = max over the phases of one layer (calibrate / solve or search / propagate) of
         (sum of the phase's terms) × (1 + SLACK) + CUDA_CONTEXT.
  The terms are written out in _phase_terms.

Host memory (`_ram` for GPU runs; on a host run the host IS the device and `_peak` adds the
same host terms, HostFacts): the process itself, the model skeleton's embeddings and head,
the next layer read ahead as stored (an FP8 original is read at ~1 byte per weight and
dequantized on the device), hidden states and AWQ caches that wait in host RAM, parked or
host-side Hessians, the layer's export (its file is streamed, no serialised copy), and the
final assembly (the head in the output dtype, a shard and the bytes copy safetensors'
save_file makes of it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from quantizer.kernels.packing import DEQUANT_SLICE_ELEMENTS, PACK_SLICE_ELEMENTS

from .memsize import MIB
from .shapes import InputGroup, ModelShapes, layer_groups, layer_kinds

# What the process holds outside torch's allocator: CUDA context, cuBLAS/cuSOLVER workspaces,
# loaded kernels. Measured by NVML's per-process query minus max reserved, H200, torch 2.11:
# 756 MiB (AWQ), 854 MiB (GPTQ, with its Triton solver) -- benchmarks/results/budget_h200_s4_*.json.
CUDA_CONTEXT = 900 * MIB
# Allocator fragmentation and small tensors nobody lists. Fitted on the same runs: max
# reserved / the terms' sum = 0.96 to 1.17 over AWQ and GPTQ at 7B and 70B width.
SLACK = 0.12
# AWQ quantizes by row slices of this many elements (methods/awq.py imports it from here), so
# its float32 temporaries are bounded whatever the width.
AWQ_QUANTIZE_SLICE_ELEMENTS = 1 << 24
# ... and writes each search candidate's fake-quantized weights by row slices of this many.
AWQ_CANDIDATE_SLICE_ELEMENTS = 1 << 22
ATTN_SCORE_COPIES = 1  # eager-like heads × S² scores per chunk: a conservative bound for sdpa


@dataclass(frozen=True)
class Decisions:
    """hidden: where the layer inputs/outputs of all samples live (gpu, cpu = host RAM, disk =
    memory-mapped files in the job directory).
    hessian: where GPTQ accumulates Hessians AND solves ('cpu' = both on the host, so the GPU
    never holds an n×n matrix; 'park' = on the GPU, but the widest group's accumulated H
    waits in host RAM while its factor is prepared and the columns solved, so at most one
    such n×n matrix is on the GPU at a time); 'none' for other methods.
    mode: 'whole' keeps the layer's weights on the GPU; 'by_group' keeps only the current
    input group's weights there and streams the other modules in one at a time for the
    forward. Either way calibration runs one pass per input group (true-sequential, as the
    methods do), so only one group's statistics/Hessian is alive at a time.
    row_slices: the quantize step handles a linear's output rows in this many slices (each row
    is independent given the Hessian, so this is exact in arithmetic, though the error
    feedback's products may round differently in the last bit); it shrinks the fp32 weight
    copies, never the Hessian, which spans the input dimension.
    experts_per_pass: MoE only, experts whose Hessians (and, by_group, weights) are alive in
    one calibration pass; fewer means more passes over the calibration data."""

    hidden: str
    hessian: str
    mode: str
    chunk: int
    row_slices: int = 1
    experts_per_pass: int = 0


# The process before any tensor of ours: Python, torch, transformers and this package, as a
# fresh `quantize` process holds them on the CPU (measured: 0.55-0.65 GiB RSS with torch 2.13
# CPU) and with the CUDA runtime, cuBLAS/cuSOLVER and Triton loaded on a GPU (constants for
# `quantize plan`; a run measures its own process at plan time and adds CUDA_HOST for a GPU).
HOST_BASE_CPU = 768 * MIB
CUDA_HOST = 2048 * MIB
# What a run's process grows by after it is planned, outside any tensor the plan counts: the
# model family's transformers modules, the meta skeleton, tokenizer and allocator arenas.
IMPORT_MARGIN = 160 * MIB
DEFAULT_SHARD = 1 << 30


@dataclass(frozen=True)
class HostFacts:
    """What host memory holds beside a layer's own work (see the module docstring)."""

    base: int = HOST_BASE_CPU + CUDA_HOST  # the process itself
    head_elements: int = 0  # embeddings + head + final norm (the skeleton, working dtype)
    head_tensor: int = 0  # elements of the largest of them (one safetensors tensor)
    stored_per_weight: float = 2.0  # bytes per layer weight as the checkpoint stores it
    export_per_weight: float = 0.52  # bytes per weight of the export (4-bit g128 + scales)
    max_shard: int = DEFAULT_SHARD  # the export's shard size (a shard is written from RAM)
    prefetch: bool = True  # GPU runs read the next layer while this one works
    save_hidden: bool = False  # CPU runs checkpoint hidden states in RAM-fitting runs
    stored_label: str = ""  # e.g. "FP8 e4m3 128x128 blocks"


@dataclass(frozen=True)
class Term:
    kind: str  # weights, hidden, reference, activations, scores, hessian, cholesky, ...
    label: str
    bytes: int


@dataclass(frozen=True)
class _Job:
    """Everything a configuration's memory depends on, except the decisions."""

    shapes: ModelShapes
    method: str
    samples: int
    seqlen: int
    d: int  # bytes per element of the working dtype
    on_host: bool  # the "device" is the CPU itself: hidden states and Hessians are local
    kinds: tuple[tuple[tuple[InputGroup, ...], int], ...]  # (groups, extra weight elements)
    forced: tuple[str, str]
    host: HostFacts = HostFacts()

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    @property
    def holds_hidden(self) -> bool:
        """Hidden states wait between layers: every calibrated method, and RTN when it is
        given calibration samples (the layer loop then propagates them for the output
        error of every layer)."""
        return self.calibrated or self.samples > 0

    @property
    def uses_gptq(self) -> bool:  # Hessians and their solve (gptq, awq-gptq)
        return self.method in ("gptq", "awq-gptq")

    @property
    def uses_awq(self) -> bool:  # AWQ's scale search and its caches (awq, awq-gptq)
        return self.method in ("awq", "awq-gptq")


@dataclass(frozen=True)
class _Peak:
    total: int
    phase: str
    breakdown: tuple[tuple[str, int], ...]
    terms: tuple[Term, ...]


def _alive_copies(g: InputGroup, dec: Decisions) -> int:
    if g.copies > 1 and dec.experts_per_pass:
        return min(g.copies, dec.experts_per_pass)
    return g.copies


def _hessian_copies(g: InputGroup, dec: Decisions) -> int:
    """Expert Hessians alive at once: GPTQ captures same-kind expert groups in batches of at
    most EXPERT_BATCH_HESSIAN_BYTES of float32 Hessians (ArchSpec.capture_batches), and the
    plan's experts_per_pass may ask for fewer."""
    from .arch.moe import EXPERT_BATCH_HESSIAN_BYTES

    k = _alive_copies(g, dec)
    if g.copies > 1:
        k = min(k, max(1, EXPERT_BATCH_HESSIAN_BYTES // (4 * g.in_features ** 2)))
    return k


def _activation_terms(job: _Job, moe: bool, dec: Decisions, hidden_local: bool) -> list[Term]:
    s, c, S, d = job.shapes, dec.chunk, job.seqlen, job.d
    tok = c * S
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    base = 2 * tok * s.hidden * d  # residual stream + normed copy
    if not hidden_local:  # this chunk's input and output, and the next input copied ahead
        base += 3 * tok * s.hidden * d
    attn = tok * (2 * q + 2 * kv) * d + (2 * tok * q * d if kv < q else 0)  # q,k,v,out; GQA
    scores = ATTN_SCORE_COPIES * c * s.heads * S * S * d
    if moe:  # router logits, k routed copies of the tokens through gate/up/act, shared expert
        mlp = (tok * s.num_experts * 4 + 3 * tok * s.experts_per_tok * s.moe_intermediate * d
               + 3 * tok * s.shared_expert_intermediate * d + tok * s.hidden * d)
    else:
        mlp = 3 * tok * s.intermediate * d  # gate, up, act(gate)·up
    # Attention's and the MLP's temporaries are freed before the other runs: count the larger.
    if attn + scores >= mlp:
        return [Term("activations", f"forward activations, chunk {c} (attention q/k/v/out)",
                     base + attn),
                Term("scores", f"attention scores {c}×{s.heads}×{S}×{S} (eager-like bound)",
                     scores)]
    return [Term("activations", f"forward activations, chunk {c} (MLP intermediate ×3)",
                 base + mlp)]


def _swap_in(lin_elements: int, d: int) -> Term:
    """Replacing a float weight by its dequantized codes: the new weight beside the old one,
    written from float32 row slices (QuantizedWeight.dequantize_to)."""
    return Term("weights", "a quantized linear dequantized beside its float weight, from "
                "fp32 row slices", lin_elements * d + 2 * min(DEQUANT_SLICE_ELEMENTS,
                                                              lin_elements) * 4)


def _parks(g: InputGroup, groups: tuple[InputGroup, ...], dec: Decisions) -> bool:
    """Whether GPTQ parks this group's Hessian under dec.hessian 'park': the widest input
    group and expert groups do; a narrower dense group keeps H and its fold on the GPU
    (methods/gptq.py GPTQ.quantize_layer)."""
    return dec.hessian == "park" and (
        g.copies > 1 or g.in_features >= max(x.in_features for x in groups))


def _solve_phases(g: InputGroup, dec: Decisions, d: int, base: list[Term],
                  hessian: Term, parked: bool) -> list[tuple[str, list[Term]]]:
    """GPTQ's solve of one input group on the GPU (methods/gptq.py, gptq_hessian.py), as three
    phases beside `base` (weights, hidden states): preparing the factor (a damped copy of H,
    factored, inverted and factored again in place); the column solve of the group's linears
    stacked by rows, one row slice at a time (U, the slice in the working dtype and two fp32
    copies: the transposed weight and the codes as floats); the error report per linear (two
    fp32 copies of a row slice: the weight or its error, and that times H). The accumulated H is alive throughout unless it is parked in
    host RAM (dec.hessian 'park') from the factor's preparation until the report; it is
    gone before the group's quantized weights are swapped in. `base` includes the codes
    quantized so far."""
    n = g.in_features
    rows = -(-sum(lin.out_features for lin in g.linears) // dec.row_slices)
    single = max(g.linears, key=lambda x: x.out_features)
    srows = -(-single.out_features // dec.row_slices)
    held_h = [] if parked else [hessian]
    return [
        (f"prepare the factor of {g.name}", base + held_h + [
            Term("cholesky", f"damped copy of H, factored in place, {n}×{n} fp32", n * n * 4)]),
        (f"solve {g.name}", base + held_h + [
            Term("cholesky", f"U, the {n}×{n} fp32 factor of the damped inverse", n * n * 4),
            Term("weight_fp32", f"{g.name} stacked ({rows}×{n} rows slice): working dtype + "
                 f"2 fp32 copies", rows * n * (d + 8))]),
        (f"error report {g.name}", base + [hessian, Term(
            "weight_fp32", f"error report of {single.name} ({srows}×{n} rows slice): 2 fp32 "
            f"copies", srows * n * 8)]),
        (f"swap in {g.name}", base + [_swap_in(single.out_features * n, d)])]


def _phase_terms(job: _Job, groups: tuple[InputGroup, ...], extra: int, moe: bool,
                 dec: Decisions) -> list[tuple[str, list[Term]]]:
    s, d, N, S, H = job.shapes, job.d, job.samples, job.seqlen, job.shapes.hidden
    c = dec.chunk
    hidden_local = dec.hidden == "gpu" or (job.on_host and dec.hidden == "cpu")
    hess_local = job.uses_gptq and (dec.hessian in ("gpu", "park") or job.on_host)
    layer_w = (sum(g.weight_elements() for g in groups) + extra) * d
    # The largest thing streamed in for a by_group forward: one linear, or one whole expert.
    unit = max(max(g.weight_elements(1) if g.copies > 1 else
                   max(lin.in_features * lin.out_features for lin in g.linears)
                   for g in groups) * d,
               sum(g.weight_elements(1) for g in groups if g.copies > 1) * d)

    def resident(g: InputGroup, forward: bool) -> list[Term]:
        if dec.mode == "whole" or job.on_host:
            return [Term("weights", f"layer weights ({d}-byte)", layer_w)]
        own = [Term("weights", f"weights of {g.name}", g.weight_elements(_alive_copies(g, dec))
                    * d)]
        return own + ([Term("weights", "one streamed module (by_group forward)", unit)]
                      if forward else [])

    def fp32_weight(g: InputGroup) -> Term:
        lin = max(g.linears, key=lambda x: x.in_features * x.out_features)
        rows = -(-lin.out_features // dec.row_slices)
        return Term("weight_fp32", f"fp32 copy of {lin.name} ({rows}×{lin.in_features} rows "
                    f"slice) + result", rows * lin.in_features * (4 + d))

    def hessian(g: InputGroup) -> Term:
        n, k = g.in_features, _hessian_copies(g, dec)
        many = f"{k}× " if k > 1 else ""
        return Term("hessian", f"{many}the {n}×{n} fp32 Hessian of {g.name}", k * n * n * 4)

    # One byte per weight: the codes of every linear quantized so far stay where they were
    # solved until the layer is exported (the last group's solve sees all of them), and the
    # export is packed there. A host solve (hessian 'cpu') leaves the GPU only the swap-in.
    on_device = not (job.uses_gptq and dec.hessian == "cpu")
    codes = [Term("codes", "quantized codes of the layer (1 byte per weight)",
                  layer_w // d)] if on_device else []
    whole = [Term("weights", f"layer weights ({d}-byte)", layer_w)]
    widest = max((lin for g in groups for lin in g.linears),
                 key=lambda x: x.in_features * x.out_features)
    export = ("export and materialise", whole + [_swap_in(
        widest.in_features * widest.out_features, d)] + (codes + [
            Term("codes", "the layer's packed export (at most 1 byte per weight)",
                 layer_w // d),
            Term("weight_fp32", "int64 temporaries of packing by slices", 3 * min(
                PACK_SLICE_ELEMENTS, widest.in_features * widest.out_features) * 8)]
        if on_device else []))
    widest_elements = widest.in_features * widest.out_features
    load = ("read the layer onto the device", whole + [
        Term("staged", "one tensor as stored, on its way to the working dtype",
             int(widest_elements * job.host.stored_per_weight)),
        Term("weight_fp32", "fp32 slices of dequantizing an original",
             2 * min(DEQUANT_SLICE_ELEMENTS, widest_elements) * 4)])
    held = []
    if hidden_local and job.holds_hidden:
        held.append(Term("hidden", f"hidden states in+out {N}×{S}×{H}", 2 * N * S * H * d))
    if not job.calibrated:
        phases = [load] + [(f"quantize {g.name}", resident(g, False) + codes
                            + [fp32_weight(g)]) for g in groups] + [export]
        if not job.holds_hidden:
            return phases
        act = _activation_terms(job, moe, dec, hidden_local)
        return [(p, t + held) for p, t in phases] + [
            ("propagate (full-layer forward)", whole + held + act)]
    act = _activation_terms(job, moe, dec, hidden_local)
    biggest = max(groups, key=lambda g: g.weight_elements(_alive_copies(g, dec)))
    phases = [(load[0], load[1] + held),
              ("propagate (full-layer forward)", resident(biggest, True) + held + act),
              (export[0], export[1] + held)]
    for g in groups:
        res = resident(g, True)
        if job.uses_gptq:
            n = g.in_features
            # XᵀX is added a fixed group of samples at a time (the same bits whatever the
            # chunking): one sample in fp32, or on a GPU a gathered group
            from .methods.gptq_hessian import hessian_update_bytes
            update = Term("hessian_update", f"X^T·X update scratch ({S}×{n} per sample)",
                          hessian_update_bytes(n, S, d, not job.on_host))
            alive = [hessian(g)] if hess_local else []
            if (dec.hessian == "gpu" or dec.hessian == "park" and not _parks(g, groups, dec)) \
                    and N > 1 and not job.on_host:
                # The shard fold (quantizer/shards.py) keeps its running total beside the
                # current shard's partial; under 'park' the total waits in host RAM instead.
                alive.append(Term("hessian", f"the running shard fold of {g.name}'s Hessian",
                                  hessian(g).bytes))
            phases.append((f"calibrate {g.name}", res + held + act + alive + [update]))
        if job.uses_awq:
            stats = g.in_features * g.copies * 4
            phases.append((f"calibrate {g.name}", res + held + act + [
                Term("stats", "AWQ per-channel activation statistics (fp32)", stats)]))
    for g in groups:
        res = resident(g, False)
        if job.uses_gptq:
            if not hess_local:  # accumulated and solved on the host
                phases.append((f"solve {g.name} (host)", res + held))
            else:
                phases += _solve_phases(g, dec, d, res + held + codes, hessian(g),
                                        _parks(g, groups, dec))
        if job.uses_awq:  # the search caches every chunk's judge input and fp reference
            n = g.in_features
            cached = Term("reference", f"AWQ judge inputs + fp references of {g.name}, "
                          f"{N}×{S}×({n}+{H})", N * S * (n + H) * d)
            if not (hidden_local or job.on_host):  # in host RAM; the next chunk copied ahead
                cached = Term("reference", f"AWQ judge input + reference, 2 chunks of {c}",
                              2 * c * S * (n + H) * d)
            phases.append((f"AWQ search {g.name}", resident(g, True) + held + act + [
                cached,
                Term("awq_scratch", f"candidate output and fp32 loss terms, chunk {c}",
                     c * S * H * (d + 8)),
                Term("awq_backup", f"original weights of {g.name}",
                     g.weight_elements(_alive_copies(g, dec)) * d),
                Term("weight_fp32", f"fp32 temporaries of fake-quantizing by row slices of "
                     f"{AWQ_CANDIDATE_SLICE_ELEMENTS} elements",
                     AWQ_CANDIDATE_SLICE_ELEMENTS * 12)]))
    if not job.uses_gptq:  # AWQ quantizes every linear at the end
        phases.append(("quantize the layer", whole + held + codes + [Term(
            "weight_fp32", f"fp32 temporaries of quantizing by row slices of "
            f"{AWQ_QUANTIZE_SLICE_ELEMENTS} elements", AWQ_QUANTIZE_SLICE_ELEMENTS * 12)]))
    return phases


def _layer_elements(groups, extra) -> int:
    return sum(g.weight_elements() for g in groups) + extra


def _host_fixed(job: _Job) -> list[Term]:
    h = job.host
    return [Term("process", "the process: Python, torch, transformers"
                 + ("" if job.on_host else ", CUDA runtime"), h.base),
            Term("head", f"embeddings, head and final norm ({job.d}-byte)",
                 h.head_elements * job.d)]


def _stored(job: _Job, elements: int, what: str) -> Term:
    h = job.host
    label = f" ({h.stored_label})" if h.stored_label else ""
    return Term("staged", f"{what} as stored, {h.stored_per_weight:.2f} bytes/weight{label}",
                int(elements * h.stored_per_weight))


def _export_copy(job: _Job, elements: int) -> Term:
    """The layer's export in host RAM while it is propagated and written (the layer file is
    streamed tensor by tensor: measurements/atomic.py, no serialised copy)."""
    return Term("export", "the layer's export (packed codes, scales, norms)",
                int(elements * job.host.export_per_weight))


def _assemble(job: _Job) -> list[Term]:
    """The final assembly: the skeleton is still alive, the head is read again in the output
    dtype (float16), shards are written from RAM, one layer file is read back at a time."""
    h = job.host
    widest = max(_layer_elements(*k) for k in job.kinds)
    layer_files, output = _export_sizes(job)
    shard = min(max(h.max_shard, h.head_tensor * 2), output)
    return _host_fixed(job) + [
        Term("export", "the head in float16 for the export", h.head_elements * 2),
        Term("export", "a shard being written and its serialised copy", 2 * shard),
        Term("export", "one layer file read back", int(widest * h.export_per_weight))]


def _host_phases(job: _Job, groups, extra, dec: Decisions, phases, assemble: bool = True):
    """A host run's phases with what the host holds beside the layer's work."""
    if not job.on_host:
        return phases
    elements = _layer_elements(groups, extra)
    hidden = []
    if job.holds_hidden and dec.hidden == "cpu":
        hidden = [Term("hidden", f"hidden states in+out {job.samples}×{job.seqlen}×"
                       f"{job.shapes.hidden}", 2 * job.samples * job.seqlen * job.shapes.hidden
                       * job.d)]
    fixed = _host_fixed(job)
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


def _peak(job: _Job, dec: Decisions, kinds=None, assemble: bool = True) -> _Peak:
    best = None
    for groups, extra in (job.kinds if kinds is None else kinds):
        moe = any(g.copies > 1 for g in groups)
        for phase, terms in _host_phases(job, groups, extra, dec,
                                         _phase_terms(job, groups, extra, moe, dec),
                                         assemble):
            raw = sum(t.bytes for t in terms)
            own = raw - sum(t.bytes for t in terms if t.kind == "process")
            total = raw + int(own * SLACK) + (0 if job.on_host else CUDA_CONTEXT)
            if best is None or total > best.total:
                best = _Peak(total, phase, (), tuple(terms))
    merged: dict[str, int] = {}
    for t in best.terms:
        merged[t.label] = merged.get(t.label, 0) + t.bytes
    own = sum(t.bytes for t in best.terms if t.kind != "process")
    merged[f"allocator slack ({SLACK:.0%} of the tensors)"] = int(own * SLACK)
    if not job.on_host:
        merged["CUDA context"] = CUDA_CONTEXT
    return replace(best, breakdown=tuple(merged.items()))


def _ram(job: _Job, dec: Decisions, kinds=None) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Host memory of a GPU configuration (a host 'device' is planned by _peak itself): the
    largest phase's (total, ((label, bytes), ...))."""
    total, _, items = _ram_peak(job, dec, kinds)
    return total, items


def _ram_peak(job: _Job, dec: Decisions, kinds=None, assemble: bool = True
              ) -> tuple[int, str, tuple[tuple[str, int], ...]]:
    d, N, S, H = job.d, job.samples, job.seqlen, job.shapes.hidden
    h = job.host
    widest = max(_layer_elements(*k) for k in job.kinds)
    fixed = _host_fixed(job)
    staged = [_stored(job, widest, "the next layer read ahead")] if h.prefetch else []
    phases: list[tuple[str, list[Term]]] = []
    for groups, extra in (job.kinds if kinds is None else kinds):
        held = []
        if job.holds_hidden and dec.hidden == "cpu":
            held.append(Term("hidden", f"hidden states in+out {N}×{S}×{H}", 2 * N * S * H * d))
        if job.holds_hidden and dec.hidden == "disk":
            held.append(Term("hidden", "hidden-state chunks in use (2 mapped, 2 staged)",
                             4 * dec.chunk * S * H * d))
        work = list(held)
        if job.uses_awq and dec.hidden in ("cpu", "disk"):
            n = max(g.in_features for g in groups)
            work.append(Term("reference", "AWQ judge inputs + fp references (widest group)",
                             N * S * (n + H) * d))
        if job.uses_gptq and dec.hessian == "park":
            n = max(g.in_features for g in groups)
            work.append(Term("hessian", "a GPTQ Hessian parked during its solve (fp32)",
                             n * n * 4))
        if job.uses_gptq and dec.hessian == "cpu":
            alive = max(g.in_features ** 2 * _hessian_copies(g, dec) for g in groups)
            n = max(g.in_features for g in groups)
            wide = max(lin.out_features * lin.in_features for g in groups for lin in g.linears)
            work.append(Term("hessian", "Hessians + Cholesky workspace (fp32, host)",
                             (alive + n * n) * 4))
            work.append(Term("weight_fp32", "fp32 weight being solved + result (host)",
                             wide * (4 + d)))
        moe = any(g.copies > 1 for g in groups)
        kind = "MoE layer" if moe else "dense layer"
        phases.append((f"quantize a {kind}", fixed + staged + work))
        phases.append((f"write a {kind}", fixed + staged + held + [
            _export_copy(job, _layer_elements(groups, extra))]))
    if assemble:
        phases.append(("assemble the export", _assemble(job)))
    phase, terms = max(phases, key=lambda p: sum(t.bytes for t in p[1]))
    merged: dict[str, int] = {}
    for t in terms:
        merged[t.label] = merged.get(t.label, 0) + t.bytes
    return sum(merged.values()), phase, tuple(merged.items())


def _make_job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host, forced, arch,
              host: HostFacts | None = None):
    kinds = []
    for moe in layer_kinds(shapes):
        groups = layer_groups(shapes, moe, arch)
        extra = shapes.hidden * (shapes.num_experts + (1 if shapes.shared_expert_intermediate
                                                         else 0)) if moe else 0  # routers
        kinds.append((groups, extra))
    if host is None:
        host = default_host(shapes, dtype_bytes, on_host)
    return _Job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host,
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
        from .originals import original_format
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


def _export_sizes(job: _Job) -> tuple[int, int]:
    """(bytes of every layer's file, bytes of the whole export with the float16 head)."""
    s, h = job.shapes, job.host
    counts = {False: s.layers - s.moe_layers, True: s.moe_layers}
    layers = 0
    for groups, extra in job.kinds:
        moe = any(g.copies > 1 for g in groups)
        layers += counts[moe] * _layer_elements(groups, extra)
    layer_files = int(layers * h.export_per_weight)
    return layer_files, layer_files + h.head_elements * 2


def disk_needs(job: _Job, dec: Decisions) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Disk a run needs beside the checkpoint: hidden states when they wait on disk (the
    inputs, the float layer's outputs and the quantized outputs: three copies while a layer
    propagates), every finished layer's file in the job directory, and the staged export (the
    job's layer files are deleted only once the export is published, so both coexist)."""
    s = job.shapes
    layer_files, output = _export_sizes(job)
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
