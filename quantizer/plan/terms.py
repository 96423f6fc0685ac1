"""The planner's vocabulary: the decisions it makes for a layer (`Decisions`), what it plans for
(`PlanJob`: shapes, method, calibration, dtype, host facts) and the memory terms every method
shares (`LayerTerms`: the layer's weights, hidden states, activations, codes, export). Each
method's own terms are in methods/<method>_memory.py and build on these; plan/memory.py puts
them together into the phases of one layer. Pure arithmetic on shapes; nothing is allocated."""
from __future__ import annotations

from dataclasses import dataclass

from quantizer.kernels.packing import DEQUANT_SLICE_ELEMENTS, PACK_SLICE_ELEMENTS

from .shapes import InputGroup, ModelShapes
from .sizes import MIB

ATTN_SCORE_COPIES = 1  # eager-like heads × S² scores per chunk: a conservative bound for sdpa
# The process before any tensor of ours: Python, torch, transformers and this package, as a
# fresh `quantize` process holds them on the CPU (measured: 0.55-0.65 GiB RSS with torch 2.13
# CPU) and with the CUDA runtime, cuBLAS/cuSOLVER and Triton loaded on a GPU (constants for
# `quantize plan`; a run measures its own process at plan time and adds CUDA_HOST for a GPU).
HOST_BASE_CPU = 768 * MIB
CUDA_HOST = 2048 * MIB
DEFAULT_SHARD = 1 << 30


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

    def describe(self) -> dict:
        """The decisions as a layer's record keeps them."""
        return {"hidden": self.hidden, "hessian": self.hessian, "mode": self.mode,
                "chunk": self.chunk, "row_slices": self.row_slices}


@dataclass(frozen=True)
class HostFacts:
    """What host memory holds beside a layer's own work (plan/memory.py's docstring)."""

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


Phase = tuple[str, list[Term]]


@dataclass(frozen=True)
class PlanJob:
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


def alive_copies(g: InputGroup, dec: Decisions) -> int:
    if g.copies > 1 and dec.experts_per_pass:
        return min(g.copies, dec.experts_per_pass)
    return g.copies


def swap_in(lin_elements: int, d: int) -> Term:
    """Replacing a float weight by its dequantized codes: the new weight beside the old one,
    written from float32 row slices (QuantizedWeight.dequantize_to)."""
    return Term("weights", "a quantized linear dequantized beside its float weight, from "
                "fp32 row slices", lin_elements * d + 2 * min(DEQUANT_SLICE_ELEMENTS,
                                                              lin_elements) * 4)


def activation_terms(job: PlanJob, moe: bool, dec: Decisions, hidden_local: bool
                     ) -> list[Term]:
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


class LayerTerms:
    """The terms of one layer kind under `dec` that every method's phases share."""

    def __init__(self, job: PlanJob, groups: tuple[InputGroup, ...], extra: int,
                 dec: Decisions, codes_on_device: bool = True):
        self.job, self.groups, self.dec = job, groups, dec
        self.moe = any(g.copies > 1 for g in groups)
        d = job.d
        self.hidden_local = dec.hidden == "gpu" or (job.on_host and dec.hidden == "cpu")
        self.layer_w = (sum(g.weight_elements() for g in groups) + extra) * d
        self.whole = [Term("weights", f"layer weights ({d}-byte)", self.layer_w)]
        # One byte per weight: the codes of every linear quantized so far stay where they were
        # solved until the layer is exported (the last group's solve sees all of them), and
        # the export is packed there. A host solve (GPTQ's hessian 'cpu') leaves the GPU only
        # the swap-in.
        self.codes_on_device = codes_on_device
        self.codes = [Term("codes", "quantized codes of the layer (1 byte per weight)",
                           self.layer_w // d)] if codes_on_device else []
        self.held = []
        if self.hidden_local and job.holds_hidden:
            N, S, H = job.samples, job.seqlen, job.shapes.hidden
            self.held.append(Term("hidden", f"hidden states in+out {N}×{S}×{H}",
                                  2 * N * S * H * d))
        self.widest = max((lin for g in groups for lin in g.linears),
                          key=lambda x: x.in_features * x.out_features)

    @property
    def activations(self) -> list[Term]:
        return activation_terms(self.job, self.moe, self.dec, self.hidden_local)

    def resident(self, g: InputGroup, forward: bool) -> list[Term]:
        """The weights on the device while `g` is worked on (whole layer, or by_group: g's
        own plus, for a forward, the largest module streamed in)."""
        job, dec, d = self.job, self.dec, self.job.d
        if dec.mode == "whole" or job.on_host:
            return list(self.whole)
        own = [Term("weights", f"weights of {g.name}", g.weight_elements(alive_copies(g, dec))
                    * d)]
        return own + ([Term("weights", "one streamed module (by_group forward)",
                            self._streamed_unit())] if forward else [])

    def _streamed_unit(self) -> int:
        """The largest thing streamed in for a by_group forward: one linear, or one expert."""
        groups, d = self.groups, self.job.d
        return max(max(g.weight_elements(1) if g.copies > 1 else
                       max(lin.in_features * lin.out_features for lin in g.linears)
                       for g in groups) * d,
                   sum(g.weight_elements(1) for g in groups if g.copies > 1) * d)

    def fp32_weight(self, g: InputGroup) -> Term:
        lin = max(g.linears, key=lambda x: x.in_features * x.out_features)
        rows = -(-lin.out_features // self.dec.row_slices)
        return Term("weight_fp32", f"fp32 copy of {lin.name} ({rows}×{lin.in_features} rows "
                    f"slice) + result", rows * lin.in_features * (4 + self.job.d))

    def export(self) -> Phase:
        widest = self.widest.in_features * self.widest.out_features
        packed = (self.codes + [
            Term("codes", "the layer's packed export (at most 1 byte per weight)",
                 self.layer_w // self.job.d),
            Term("weight_fp32", "int64 temporaries of packing by slices",
                 3 * min(PACK_SLICE_ELEMENTS, widest) * 8)]) if self.codes_on_device else []
        return ("export and materialise", self.whole + [swap_in(widest, self.job.d)] + packed)

    def load(self) -> Phase:
        widest = self.widest.in_features * self.widest.out_features
        return ("read the layer onto the device", self.whole + [
            Term("staged", "one tensor as stored, on its way to the working dtype",
                 int(widest * self.job.host.stored_per_weight)),
            Term("weight_fp32", "fp32 slices of dequantizing an original",
                 2 * min(DEQUANT_SLICE_ELEMENTS, widest) * 4)])

    def propagate(self, resident: list[Term]) -> Phase:
        return ("propagate (full-layer forward)", resident + self.held + self.activations)
