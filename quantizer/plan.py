"""The memory planner: a pure function of model shapes × method × calibration size × devices ×
budgets → where everything lives, how large each forward chunk is, and the predicted peak.

How a plan is found. Every device starts from the fastest configuration (hidden states,
Hessians and the whole layer on the GPU; the largest power-of-two chunk) and applies moves in a
fixed order of increasing cost (see _MOVES) — at each step the cheapest move that lowers the
predicted peak — until the peak fits the budget. The sequence of configurations does not depend
on the budget, only where it stops does; so a smaller budget never gets a configuration that
uses more GPU memory, and the last configuration of the sequence is the smallest budget that
works: that is the number a refusal quotes.

Memory model (bytes; d = working dtype size, N×S calibration samples × tokens, H hidden):
  peak = max over the phases of one layer (calibrate / solve or search / propagate) of
         (sum of the phase's terms) × (1 + SLACK) + CUDA_CONTEXT.
  The terms are written out in _phase_terms."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from .errors import InputError, OutOfMemory
from .memsize import (MIB, default_ram_budget, format_size, format_size_up, gpu_memory,
                      parse_budgets, parse_size, vram_margin)

CUDA_CONTEXT = 500 * MIB  # context + cuBLAS workspace + allocator's first segments
SLACK = 0.10  # allocator fragmentation and small tensors nobody lists
TARGET_TOKENS = 4096  # tokens per forward beyond which a larger chunk buys little speed
MAX_ROW_SLICES = 32
ATTN_SCORE_COPIES = 1  # eager-like heads × S² scores per chunk: a conservative bound for sdpa
METHODS = ("rtn", "awq", "gptq")
HIDDEN_PLACES = ("gpu", "cpu", "disk")


# ---------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShapes:
    """The numbers of a HF config that decide memory and tensor-parallel alignment."""

    model_type: str
    hidden: int
    intermediate: int  # dense MLP width; 0 when every layer is MoE without a dense MLP
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    num_experts: int = 0
    moe_intermediate: int = 0  # one expert's MLP width
    experts_per_tok: int = 0
    shared_expert_intermediate: int = 0
    moe_layers: int = 0  # how many decoder layers are MoE (the rest are dense)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShapes":
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": cfg.get("model_type", "")}

        def need(key):
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"config.json: {key!r} must be a positive integer, got {v!r}")
            return v

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), \
            need("num_hidden_layers")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        common = dict(model_type=str(cfg.get("model_type", "")), hidden=hidden, heads=heads,
                      kv_heads=kv, head_dim=head_dim, layers=layers,
                      vocab=int(cfg.get("vocab_size") or 0))
        if cfg.get("num_local_experts"):  # Mixtral: intermediate_size IS the expert width
            return cls(**common, intermediate=0, num_experts=cfg["num_local_experts"],
                       moe_intermediate=need("intermediate_size"),
                       experts_per_tok=cfg.get("num_experts_per_tok") or 2, moe_layers=layers)
        if cfg.get("num_experts") and cfg.get("moe_intermediate_size"):  # Qwen2-MoE / Qwen3-MoE
            step = cfg.get("decoder_sparse_step") or 1
            dense_only = set(cfg.get("mlp_only_layers") or ())
            moe_layers = sum(1 for i in range(layers)
                             if i not in dense_only and (i + 1) % step == 0)
            return cls(**common, intermediate=int(cfg.get("intermediate_size") or 0),
                       num_experts=cfg["num_experts"],
                       moe_intermediate=cfg["moe_intermediate_size"],
                       experts_per_tok=cfg.get("num_experts_per_tok") or 1,
                       shared_expert_intermediate=int(
                           cfg.get("shared_expert_intermediate_size") or 0),
                       moe_layers=moe_layers)
        return cls(**common, intermediate=need("intermediate_size"))


@dataclass(frozen=True)
class Linear:
    name: str  # module name inside a decoder layer (experts: a label such as experts.down)
    in_features: int
    out_features: int
    parallel: str  # how tensor parallelism splits it: "column" (outputs) or "row" (inputs)


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input: one Hessian / one activation statistic each copy.
    copies > 1 for MoE experts: independent instances, each with its own state."""

    name: str
    linears: tuple[Linear, ...]
    copies: int = 1

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    def weight_elements(self, copies: int | None = None) -> int:
        n = self.copies if copies is None else copies
        return n * sum(lin.in_features * lin.out_features for lin in self.linears)


def resolve_arch(shapes: ModelShapes, arch):
    """The arch spec naming the layer's modules: given, registered, or — for MoE families that
    have no arch file yet (Mixtral, Qwen2/3-MoE) — the Llama attention they share."""
    if arch is not None:
        return arch
    from .arch import get_arch
    try:
        return get_arch(shapes.model_type)
    except InputError:
        if not shapes.is_moe:
            raise
        from .arch.llama import SPEC
        return SPEC


def _dense_linear(name: str, s: ModelShapes, arch) -> Linear:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if name == arch.mlp_down:
        return Linear(name, s.intermediate, s.hidden, "row")
    if name in arch.mlp_gate_up:
        return Linear(name, s.hidden, s.intermediate, "column")
    # Attention projections by their role; the names themselves come from the arch file.
    roles = {"q_proj": (s.hidden, q, "column"), "k_proj": (s.hidden, kv, "column"),
             "v_proj": (s.hidden, kv, "column"), "o_proj": (q, s.hidden, "row")}
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in roles:
        raise InputError(f"planner: no shape rule for module {name!r} of {arch.name}")
    return Linear(name, *roles[leaf])


def layer_groups(shapes: ModelShapes, moe: bool, arch=None) -> tuple[InputGroup, ...]:
    """The input groups of one decoder layer (dense, or MoE when `moe`), in execution order."""
    arch = resolve_arch(shapes, arch)
    mlp_names = set(arch.mlp_gate_up) | {arch.mlp_down}
    groups = []
    for names in arch.input_groups:
        if moe and set(names) & mlp_names:
            continue
        groups.append(InputGroup(names[0] if len(names) == 1 else "+".join(
            n.rsplit(".", 1)[-1] for n in names), tuple(_dense_linear(n, shapes, arch)
                                                     for n in names)))
    if not moe:
        return tuple(groups)
    h, e, mi = shapes.hidden, shapes.num_experts, shapes.moe_intermediate
    groups.append(InputGroup("experts.gate+up", (Linear("experts.gate", h, mi, "column"),
                                                  Linear("experts.up", h, mi, "column")), e))
    groups.append(InputGroup("experts.down", (Linear("experts.down", mi, h, "row"),), e))
    si = shapes.shared_expert_intermediate
    if si:
        groups.append(InputGroup("shared_expert.gate+up", (
            Linear("shared_expert.gate", h, si, "column"),
            Linear("shared_expert.up", h, si, "column"))))
        groups.append(InputGroup("shared_expert.down", (Linear("shared_expert.down", si, h,
                                                                "row"),)))
    return tuple(groups)


def layer_kinds(shapes: ModelShapes) -> tuple[bool, ...]:
    """Which layer kinds the model has: (False,) dense only, (True,) MoE only, or both."""
    kinds = []
    if shapes.layers - shapes.moe_layers > 0:
        kinds.append(False)
    if shapes.moe_layers > 0:
        kinds.append(True)
    return tuple(kinds)


class PlanError(InputError):
    """No configuration fits: carries the smallest budget that would and what to change."""

    def __init__(self, message: str, needed: int = 0, culprit: str = ""):
        super().__init__(message)
        self.needed = needed
        self.culprit = culprit


@dataclass(frozen=True)
class DeviceSpec:
    index: int  # CUDA ordinal; -1 is the host CPU
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = 0

    @property
    def is_host(self) -> bool:
        return self.index < 0

    @property
    def label(self) -> str:
        return "cpu" if self.is_host else f"cuda:{self.index}"


@dataclass(frozen=True)
class Decisions:
    """hidden: where the layer inputs/outputs of all samples live (gpu, pinned cpu, disk).
    hessian: where GPTQ accumulates Hessians AND solves ('cpu' = both on the host, so the GPU
    never holds an n×n matrix); 'none' for other methods.
    mode: 'whole' keeps the layer's weights on the GPU; 'by_group' keeps only the current
    input group's weights there and streams the other modules in one at a time for the
    forward. Either way calibration runs one pass per input group (true-sequential, as the
    methods do), so only one group's statistics/Hessian is alive at a time.
    row_slices: the quantize step handles a linear's output rows in this many slices (each row
    is independent given the Hessian, so this is exact); it shrinks the fp32 weight copy, never
    the Hessian, which spans the input dimension.
    experts_per_pass: MoE only, experts whose Hessians (and, by_group, weights) are alive in
    one calibration pass; fewer means more passes over the calibration data."""

    hidden: str
    hessian: str
    mode: str
    chunk: int
    row_slices: int = 1
    experts_per_pass: int = 0


@dataclass(frozen=True)
class Term:
    kind: str  # weights, hidden, reference, activations, scores, hessian, cholesky, ...
    label: str
    bytes: int


@dataclass(frozen=True)
class DevicePlan:
    device: DeviceSpec
    budget: int
    decisions: Decisions
    predicted_peak: int
    breakdown: tuple[tuple[str, int], ...]  # the peak phase's terms; sums to predicted_peak
    peak_phase: str
    layers: tuple[int, ...] = ()
    steps: tuple[str, ...] = ()  # the moves taken from the fastest configuration, in order


@dataclass(frozen=True)
class Plan:
    shapes: ModelShapes
    method: str
    calib_samples: int
    calib_seqlen: int
    dtype_bytes: int
    devices: tuple[DevicePlan, ...]
    ram_budget: int
    ram_peak: int
    ram_breakdown: tuple[tuple[str, int], ...]
    forced: tuple[str, str] = ("auto", "auto")  # (hidden_device, hessian_device) as asked
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def predicted_peak(self) -> dict[int, int]:
        return {dp.device.index: dp.predicted_peak for dp in self.devices}

    def device_plan_for(self, layer_index: int) -> DevicePlan:
        for dp in self.devices:
            if layer_index in dp.layers:
                return dp
        raise IndexError(f"layer {layer_index} is not in the plan "
                         f"({self.shapes.layers} layers)")

    def decisions_for(self, layer_index: int) -> Decisions:
        return self.device_plan_for(layer_index).decisions

    def format(self) -> str:
        return _format_plan(self)


# ---------------------------------------------------------------- memory model


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

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"


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


def _activation_terms(job: _Job, moe: bool, dec: Decisions, hidden_local: bool) -> list[Term]:
    s, c, S, d = job.shapes, dec.chunk, job.seqlen, job.d
    tok = c * S
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    base = 2 * tok * s.hidden * d  # residual stream + normed copy
    if not hidden_local:
        base += 2 * tok * s.hidden * d  # this chunk's inputs and outputs, copied in
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


def _phase_terms(job: _Job, groups: tuple[InputGroup, ...], extra: int, moe: bool,
                 dec: Decisions) -> list[tuple[str, list[Term]]]:
    s, d, N, S, H = job.shapes, job.d, job.samples, job.seqlen, job.shapes.hidden
    c = dec.chunk
    hidden_local = dec.hidden == "gpu" or (job.on_host and dec.hidden == "cpu")
    hess_local = job.method == "gptq" and (dec.hessian == "gpu" or job.on_host)
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
        n, k = g.in_features, _alive_copies(g, dec)
        many = f"{k}× " if k > 1 else ""
        return Term("hessian", f"{many}the {n}×{n} fp32 Hessian of {g.name}", k * n * n * 4)

    if not job.calibrated:
        return [(f"quantize {g.name}", resident(g, False) + [fp32_weight(g)]) for g in groups]
    held = []
    if hidden_local:
        held.append(Term("hidden", f"hidden states in+out {N}×{S}×{H}", 2 * N * S * H * d))
    act = _activation_terms(job, moe, dec, hidden_local)
    biggest = max(groups, key=lambda g: g.weight_elements(_alive_copies(g, dec)))
    phases = [("propagate (full-layer forward)", resident(biggest, True) + held + act)]
    for g in groups:
        res = resident(g, True)
        if job.method == "gptq":
            n = g.in_features
            update = Term("hessian_update", f"chunk input in fp32 for X^T·X ({c}×{S}×{n})",
                          c * S * n * 4)
            alive = [hessian(g)] if hess_local else []
            phases.append((f"calibrate {g.name}", res + held + act + alive + [update]))
        else:
            stats = g.in_features * g.copies * 4
            phases.append((f"calibrate {g.name}", res + held + act + [
                Term("stats", "AWQ per-channel activation statistics (fp32)", stats)]))
    for g in groups:
        res = resident(g, False)
        if job.method == "gptq":
            if not hess_local:  # accumulated and solved on the host
                phases.append((f"solve {g.name} (host)", res + held))
                continue
            n = g.in_features
            workspace = Term("cholesky", f"Cholesky workspace {n}×{n} fp32", n * n * 4)
            phases.append((f"solve {g.name}", res + held + [hessian(g), workspace,
                                                             fp32_weight(g)]))
        else:  # AWQ: the search caches every chunk's judge input and fp reference output
            n = g.in_features
            cached = Term("reference", f"AWQ judge inputs + fp references of {g.name}, "
                          f"{N}×{S}×({n}+{H})", N * S * (n + H) * d)
            if not (hidden_local or job.on_host):  # cached in host RAM; one chunk copied in
                cached = Term("reference", f"AWQ judge input + reference, chunk {c}",
                              c * S * (n + H) * d)
            lin = max(g.linears, key=lambda x: x.in_features * x.out_features)
            rows = -(-lin.out_features // dec.row_slices)
            phases.append((f"AWQ search {g.name}", resident(g, True) + held + act + [
                cached,
                Term("awq_scratch", f"candidate output and fp32 loss terms, chunk {c}",
                     c * S * H * (d + 8)),
                Term("awq_backup", f"original weights of {g.name}",
                     g.weight_elements(_alive_copies(g, dec)) * d),
                Term("weight_fp32", f"fp32 scaled and fake-quantized {lin.name} "
                     f"({rows}×{lin.in_features} rows slice)", rows * lin.in_features * 8)]))
    return phases


def _peak(job: _Job, dec: Decisions) -> _Peak:
    best = None
    for groups, extra in job.kinds:
        moe = any(g.copies > 1 for g in groups)
        for phase, terms in _phase_terms(job, groups, extra, moe, dec):
            raw = sum(t.bytes for t in terms)
            total = raw + int(raw * SLACK) + (0 if job.on_host else CUDA_CONTEXT)
            if best is None or total > best.total:
                best = _Peak(total, phase, (), tuple(terms))
    merged: dict[str, int] = {}
    for t in best.terms:
        merged[t.label] = merged.get(t.label, 0) + t.bytes
    raw = sum(merged.values())
    merged[f"allocator slack ({SLACK:.0%})"] = int(raw * SLACK)
    if not job.on_host:
        merged["CUDA context"] = CUDA_CONTEXT
    return replace(best, breakdown=tuple(merged.items()))


def _ram(job: _Job, dec: Decisions) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Host memory of a GPU configuration (a host 'device' is planned by _peak itself)."""
    d, N, S, H = job.d, job.samples, job.seqlen, job.shapes.hidden
    worst: tuple[int, tuple[tuple[str, int], ...]] = (0, ())
    for groups, extra in job.kinds:
        items = [("layer weights staged from the checkpoint",
                  (sum(g.weight_elements() for g in groups) + extra) * d)]
        if job.calibrated and dec.hidden == "cpu":
            items.append((f"hidden states in+out {N}×{S}×{H} (pinned)", 2 * N * S * H * d))
        if job.method == "awq" and dec.hidden in ("cpu", "disk"):
            n = max(g.in_features for g in groups)
            items.append(("AWQ judge inputs + fp references (widest group)",
                          N * S * (n + H) * d))
        if job.calibrated and dec.hidden == "disk":
            items.append(("hidden-state staging buffers", 4 * dec.chunk * S * H * d))
        if job.method == "gptq" and dec.hessian == "cpu":
            alive = max(g.in_features ** 2 * _alive_copies(g, dec) for g in groups)
            n = max(g.in_features for g in groups)
            wide = max(lin.out_features * lin.in_features for g in groups for lin in g.linears)
            items.append(("Hessians + Cholesky workspace (fp32, host)", (alive + n * n) * 4))
            items.append(("fp32 weight being solved + result (host)", wide * (4 + d)))
        total = sum(b for _, b in items)
        if total >= worst[0]:
            worst = (total, tuple(items))
    return worst


# ---------------------------------------------------------------- search

# Moves from the fastest configuration, cheapest first. Each is taken only when it lowers the
# predicted peak; "chunk_to_target" shrinks chunks that are larger than a GPU needs to be busy.
_MOVES = ("chunk_to_target", "row_slices", "hidden_off_gpu", "by_group", "experts", "chunk",
          "hessian_off_gpu")


def _ram_ok(job: _Job, dec: Decisions, ram_budget: int) -> bool:
    return job.on_host or _ram(job, dec)[0] <= ram_budget


def _apply(move: str, job: _Job, dec: Decisions, ram_budget: int) -> Decisions | None:
    hidden_forced, hessian_forced = job.forced
    if move == "chunk_to_target" and dec.chunk > 1 and dec.chunk * job.seqlen > TARGET_TOKENS:
        return replace(dec, chunk=dec.chunk // 2)
    if move == "chunk" and dec.chunk > 1:
        return replace(dec, chunk=dec.chunk // 2)
    if move == "row_slices" and dec.row_slices < MAX_ROW_SLICES:
        return replace(dec, row_slices=dec.row_slices * 2)
    if move == "hidden_off_gpu" and hidden_forced == "auto" and job.calibrated:
        if job.on_host:  # the host is the device: only disk frees its memory
            return replace(dec, hidden="disk") if dec.hidden == "cpu" else None
        if dec.hidden == "gpu":
            to_cpu = replace(dec, hidden="cpu")
            return to_cpu if _ram_ok(job, to_cpu, ram_budget) else replace(dec, hidden="disk")
    if move == "by_group" and dec.mode == "whole":
        return replace(dec, mode="by_group")
    if move == "experts" and dec.experts_per_pass > 1:
        return replace(dec, experts_per_pass=dec.experts_per_pass // 2)
    if (move == "hessian_off_gpu" and job.method == "gptq" and hessian_forced == "auto"
            and dec.hessian == "gpu" and not job.on_host):
        moved = replace(dec, hessian="cpu")
        if _ram_ok(job, moved, ram_budget):
            return moved
        if moved.hidden == "cpu" and hidden_forced == "auto":
            moved = replace(moved, hidden="disk")
            return moved if _ram_ok(job, moved, ram_budget) else None
    return None


def _start(job: _Job) -> Decisions:
    hidden_forced, hessian_forced = job.forced
    hidden = hidden_forced if hidden_forced != "auto" else ("cpu" if job.on_host else "gpu")
    if job.method != "gptq":
        hessian = "none"
    else:
        hessian = "cpu" if job.on_host else (hessian_forced if hessian_forced != "auto"
                                             else "gpu")
    chunk = 1
    while chunk * 2 <= job.samples:
        chunk *= 2
    experts = max((g.copies for groups, _ in job.kinds for g in groups if g.copies > 1),
                  default=0)
    return Decisions(hidden=hidden if job.calibrated else "none", hessian=hessian,
                     mode="whole", chunk=chunk if job.calibrated else 1, row_slices=1,
                     experts_per_pass=experts)


def _search(job: _Job, budget: int, ram_budget: int
            ) -> tuple[Decisions, _Peak, tuple[str, ...], bool]:
    """Walk the fixed move sequence until the peak fits; (decisions, peak, steps, fits)."""
    dec = _start(job)
    peak = _peak(job, dec)
    steps: list[str] = []
    while peak.total > budget or not _ram_ok(job, dec, ram_budget):
        for move in _MOVES:
            cand = _apply(move, job, dec, ram_budget)
            if cand is None:
                continue
            cand_peak = _peak(job, cand)
            if cand_peak.total < peak.total or (
                    not _ram_ok(job, dec, ram_budget) and _ram_ok(job, cand, ram_budget)):
                dec, peak = cand, cand_peak
                steps.append(move)
                break
        else:
            return dec, peak, tuple(steps), False
    return dec, peak, tuple(steps), True


# ---------------------------------------------------------------- planning

_ADVICE = {
    "hessian": "try --hessian-device cpu (fewer calibration tokens do not shrink a Hessian)",
    "cholesky": "try --hessian-device cpu",
    "hidden": "try --hidden-device cpu (or disk), or fewer calibration tokens "
              "(--calib-samples / --calib-seqlen)",
    "reference": "try --hidden-device cpu, or fewer calibration tokens",
    "scores": "try a shorter --calib-seqlen (scores grow with its square)",
    "activations": "try a shorter --calib-seqlen",
    "weights": "modules are already streamed one at a time: a larger budget is the only fix",
    "context": "every GPU process pays this before any tensor: a larger budget is the only fix",
    "weight_fp32": "a larger budget",
}


def _culprit(peak: _Peak, on_host: bool) -> Term:
    context = () if on_host else (Term("context", "the CUDA context and cuBLAS workspace",
                                       CUDA_CONTEXT),)
    return max(peak.terms + context, key=lambda t: t.bytes)


def _refusal(label: str, budget: int, peak: _Peak, forced: tuple[str, str],
             ram_note: str = "", on_host: bool = False) -> PlanError:
    culprit = _culprit(peak, on_host)
    advice = _ADVICE.get(culprit.kind, "a larger budget")
    if culprit.kind in ("hessian", "cholesky") and (forced[1] == "cpu" or "host RAM" in ram_note):
        advice = "raise --ram-budget (Hessians on the CPU) or the VRAM budget"
    if culprit.kind in ("hidden", "reference") and forced[0] != "gpu":
        advice = "fewer calibration tokens (--calib-samples / --calib-seqlen)"
    msg = (f"no plan fits {label}'s budget of {format_size(budget)}: needs ≥ "
           f"{format_size_up(peak.total)}: {culprit.label} ({format_size(culprit.bytes)}, "
           f"during {peak.phase}); {advice}{ram_note}")
    return PlanError(msg, needed=peak.total, culprit=culprit.label)


def _make_job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host, forced, arch):
    kinds = []
    for moe in layer_kinds(shapes):
        groups = layer_groups(shapes, moe, arch)
        extra = shapes.hidden * (shapes.num_experts + (1 if shapes.shared_expert_intermediate
                                                         else 0)) if moe else 0  # routers
        kinds.append((groups, extra))
    return _Job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host,
                tuple(kinds), forced)


def _split_layers(n_layers: int, budgets: list[int]) -> list[tuple[int, ...]]:
    """Contiguous blocks of layers, sized in proportion to each device's budget."""
    total = sum(budgets)
    exact = [n_layers * b / total for b in budgets]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(budgets)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:n_layers - sum(counts)]:
        counts[i] += 1
    blocks, start = [], 0
    for c in counts:
        blocks.append(tuple(range(start, start + c)))
        start += c
    return blocks


def make_plan(shapes: ModelShapes, method: str, calib_samples: int, calib_seqlen: int,
              devices: list[DeviceSpec], vram_budgets: dict[int, int], ram_budget: int,
              dtype_bytes: int = 2, hidden_device: str = "auto", hessian_device: str = "auto",
              arch=None) -> Plan:
    """Pure: the same arguments always give an equal Plan; nothing is read or allocated.

    `devices` empty (or one DeviceSpec(-1)) plans for the host CPU with `ram_budget`.
    Raises PlanError (an InputError) when no configuration fits on any device."""
    if method not in METHODS:
        raise InputError(f"planner: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method != "rtn" and (calib_samples < 1 or calib_seqlen < 1):
        raise InputError(f"{method} needs calibration samples and tokens, got "
                         f"{calib_samples} × {calib_seqlen}")
    if dtype_bytes not in (1, 2, 4):
        raise InputError(f"working dtype must be 1, 2 or 4 bytes, got {dtype_bytes}")
    if hidden_device not in ("auto",) + HIDDEN_PLACES:
        raise InputError(f"--hidden-device must be auto, gpu, cpu or disk, got {hidden_device!r}")
    if hessian_device not in ("auto", "gpu", "cpu"):
        raise InputError(f"--hessian-device must be auto, gpu or cpu, got {hessian_device!r}")
    devices = list(devices) or [DeviceSpec(-1, "host")]
    on_host = all(dev.is_host for dev in devices)
    if not on_host and any(dev.is_host for dev in devices):
        raise InputError("plan either GPUs or the host CPU, not both at once")
    if on_host and hidden_device == "gpu":
        raise InputError("--hidden-device gpu with no GPU to plan for")
    forced = (hidden_device, hessian_device)
    job = _make_job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host, forced,
                    arch)
    fitting, refusals, notes = [], [], []
    for dev in devices:
        budget = ram_budget if dev.is_host else vram_budgets.get(dev.index)
        if budget is None:
            raise InputError(f"no VRAM budget for {dev.label}")
        dec, peak, steps, fits = _search(job, budget, ram_budget)
        if fits:
            fitting.append((dev, budget, dec, peak, steps))
        else:
            ram_note = "" if _ram_ok(job, dec, ram_budget) else (
                f"; host RAM also short: needs {format_size_up(_ram(job, dec)[0])} of "
                f"{format_size(ram_budget)} (--ram-budget)")
            host = replace(dec, hessian="cpu", hidden="disk" if dec.hidden == "cpu"
                           else dec.hidden)
            if (job.method == "gptq" and dec.hessian == "gpu" and forced[1] == "auto"
                    and not on_host and _apply("hessian_off_gpu", job, dec, ram_budget) is None
                    and _peak(job, host).total < peak.total):  # blocked by host RAM
                ram_note = (f" — Hessians on the CPU would fit the GPU but need "
                            f"{format_size_up(_ram(job, host)[0])} of host RAM (--ram-budget "
                            f"is {format_size(ram_budget)}){ram_note}")
            refusals.append(_refusal(dev.label, budget, peak, forced, ram_note, on_host))
            notes.append(f"{dev.label} left out: {refusals[-1]}")
    if not fitting:
        raise refusals[0] if len(refusals) == 1 else PlanError(
            "; ".join(str(r) for r in refusals), needed=min(r.needed for r in refusals),
            culprit=refusals[0].culprit)
    blocks = _split_layers(shapes.layers, [b for _, b, *_ in fitting])
    plans = tuple(DevicePlan(dev, budget, dec, peak.total, peak.breakdown, peak.phase, block,
                             steps) for (dev, budget, dec, peak, steps), block
                  in zip(fitting, blocks))
    ram_peak, ram_items = (max(dp.predicted_peak for dp in plans), ()) if on_host else max(
        _ram(job, dp.decisions) for dp in plans)
    return Plan(shapes, method, calib_samples, calib_seqlen, dtype_bytes, plans, ram_budget,
                ram_peak, ram_items, forced, tuple(notes))


def shrink(plan: Plan, layer_index: int, arch=None) -> Plan:
    """OOM recovery for the device that runs `layer_index` (and every later layer on it):
    halve the chunk; at chunk 1 move the largest movable item off the GPU (hidden states,
    Hessians, the whole-layer weights, the fp32 weight copy). OutOfMemory when none is left."""
    dp = plan.device_plan_for(layer_index)
    job = _make_job(plan.shapes, plan.method, plan.calib_samples, plan.calib_seqlen,
                    plan.dtype_bytes, dp.device.is_host, plan.forced, arch)
    dec = dp.decisions
    if dec.chunk > 1:
        new, step = replace(dec, chunk=dec.chunk // 2), "oom: chunk"
    else:
        sizes: dict[str, int] = {}
        for t in _peak(job, dec).terms:
            sizes[t.kind] = sizes.get(t.kind, 0) + t.bytes
        options = []  # (bytes the move frees, move)
        for move, kinds in (("hidden_off_gpu", ("hidden", "reference")),
                            ("hessian_off_gpu", ("hessian", "cholesky")),
                            ("experts", ("hessian",)), ("by_group", ("weights",)),
                            ("row_slices", ("weight_fp32",))):
            cand = _apply(move, job, dec, plan.ram_budget)
            if cand is not None and cand != dec:
                options.append((sum(sizes.get(k, 0) for k in kinds), move, cand))
        if not options:
            raise OutOfMemory(f"layer {layer_index} ran out of memory on {dp.device.label} at "
                              f"chunk 1 with nothing left to move off the GPU; predicted peak "
                              f"{format_size(dp.predicted_peak)} of {format_size(dp.budget)}")
        _, move, new = max(options, key=lambda o: o[0])
        step = f"oom: {move}"
    peak = _peak(job, new)
    new_dp = replace(dp, decisions=new, predicted_peak=peak.total, breakdown=peak.breakdown,
                     peak_phase=peak.phase, steps=dp.steps + (step,))
    devices = tuple(new_dp if x is dp else x for x in plan.devices)
    note = f"layer {layer_index}: out of memory on {dp.device.label}; {step}"
    return replace(plan, devices=devices, notes=plan.notes + (note,))


# ---------------------------------------------------------------- reading it


def _layer_span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _format_plan(plan: Plan) -> str:
    s = plan.shapes
    moe = (f" · {s.num_experts} experts × {s.moe_intermediate} (top-{s.experts_per_tok}"
           + (f", shared {s.shared_expert_intermediate}" if s.shared_expert_intermediate
              else "") + f") in {s.moe_layers} layers") if s.is_moe else ""
    calib = ("no calibration" if plan.method == "rtn" else
             f"calibration {plan.calib_samples} × {plan.calib_seqlen} tokens")
    lines = [f"plan for {s.model_type or 'model'}: {s.layers} layers · hidden {s.hidden} · "
             f"intermediate {s.intermediate} · heads {s.heads} (kv {s.kv_heads}) × "
             f"{s.head_dim}{moe}",
             f"method {plan.method} · {calib} · working dtype {plan.dtype_bytes} bytes", ""]
    header = ("device", "budget", "predicted peak", "layers", "hidden", "hessian", "mode",
              "chunk", "row slices", "experts/pass")
    rows = [header]
    for dp in plan.devices:
        d = dp.decisions
        rows.append((dp.device.label, format_size(dp.budget), format_size(dp.predicted_peak),
                     _layer_span(dp.layers), d.hidden, d.hessian, d.mode, str(d.chunk),
                     str(d.row_slices), str(d.experts_per_pass or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for dp in plan.devices:
        lines += ["", f"peak on {dp.device.label} during {dp.peak_phase}:"]
        width = max(len(k) for k, _ in dp.breakdown)
        lines += [f"  {k.ljust(width)}  {format_size(v):>10}" for k, v in dp.breakdown]
        lines.append(f"  {'total'.ljust(width)}  {format_size(dp.predicted_peak):>10}")
        if dp.steps:
            runs: list[list] = []
            for step in dp.steps:
                if runs and runs[-1][0] == step:
                    runs[-1][1] += 1
                else:
                    runs.append([step, 1])
            lines.append("  moves from the fastest configuration: " + ", ".join(
                f"{step} ×{n}" if n > 1 else step for step, n in runs))
    if plan.ram_breakdown:
        lines += ["", f"host RAM: {format_size(plan.ram_peak)} of "
                      f"{format_size(plan.ram_budget)}"]
        lines += [f"  {k}: {format_size(v)}" for k, v in plan.ram_breakdown]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def detect_devices(indices: list[int] | None = None) -> list[DeviceSpec]:
    return [DeviceSpec(i, name, total, free) for i, name, total, free in gpu_memory(indices)]


def default_vram_budgets(devices: list[DeviceSpec]) -> dict[int, int]:
    """Free memory as nvidia-ml-py reported it, minus a safety margin (memsize.vram_margin)."""
    return {d.index: max(0, d.free_bytes - vram_margin(d.total_bytes)) for d in devices}


def _read_config(model_dir_or_config) -> dict:
    if isinstance(model_dir_or_config, dict):
        return model_dir_or_config
    path = os.fspath(model_dir_or_config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise InputError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    return cfg


def plan_command(model_dir_or_config, bits, method: str = "awq",
                 vram_budget_str: str | None = None, ram_budget_str: str | None = None,
                 devices=None, calib_samples: int = 128, calib_seqlen: int = 512,
                 hidden_device: str = "auto", hessian_device: str = "auto",
                 dtype_bytes: int = 2) -> str:
    """`quantize plan MODEL --bits 4 --vram-budget 16G`: reads config.json only (no weights)
    and returns the formatted plan. `devices`: None/'auto' (every visible GPU), '0,1' or a
    list of indices. With a budget but no visible GPU, plans for the GPUs the budget names
    (or cuda:0), so a plan can be made on a machine without the target GPU."""
    try:
        bits_value = float(bits)
    except (TypeError, ValueError):
        raise InputError(f"--bits must be a number, got {bits!r}") from None
    if not 2 <= bits_value <= 8:
        raise InputError(f"--bits must be between 2 and 8, got {bits}")
    shapes = ModelShapes.from_config(_read_config(model_dir_or_config))
    if isinstance(devices, str) and devices not in ("", "auto"):
        try:
            devices = [int(x) for x in devices.split(",")]
        except ValueError:
            raise InputError(f"--devices must be a list of GPU indices, got {devices!r}") \
                from None
    detected = {d.index: d for d in detect_devices()}
    wanted = sorted(detected) if devices in (None, "", "auto") else list(devices)
    if vram_budget_str:
        if not wanted:  # planning for a GPU this machine does not have
            wanted = sorted(parse_budgets(vram_budget_str)) if ":" in vram_budget_str else [0]
        budgets = parse_budgets(vram_budget_str, wanted)
    else:
        budgets = default_vram_budgets([detected[i] for i in wanted if i in detected])
        missing = [i for i in wanted if i not in budgets]
        if missing:
            raise InputError(f"no GPU {missing} visible to measure free memory; "
                             f"give --vram-budget")
    specs = [detected.get(i, DeviceSpec(i)) for i in wanted]
    ram = parse_size(ram_budget_str) if ram_budget_str else default_ram_budget()
    plan = make_plan(shapes, method, calib_samples, calib_seqlen, specs, budgets, ram,
                     dtype_bytes, hidden_device, hessian_device)
    return f"{bits_value:g}-bit {method}\n" + plan.format()
