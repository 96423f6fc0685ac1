"""What methods see of one decoder layer: which linears to quantize, in which order, which
share an input, and AWQ's scaling groups. Specs are discovered from transformers' own layer
(quantizer/arch/discover.py); names are on-disk tensor names relative to the decoder layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# GPTQ captures the inputs of several experts in one forward (their Hessians alive at once)
# up to this many bytes of float32 Hessians: all of a Mixtral-8x7B layer's gate/up groups
# (8 x 64 MiB), two of its down groups (784 MiB each), 32 of Qwen3-30B-A3B's gate/up groups.
EXPERT_BATCH_HESSIAN_BYTES = 2 << 30


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scaling group: `prev` (a norm or a linear) feeds `linears`; the scales found for
    them are folded into `prev`. `judge` names the submodule whose output measures the error
    (e.g. the whole attention block for q/k/v). `when` names a shape condition (see
    ArchSpec.condition) that must hold, else the group is skipped and reported."""

    prev: str
    linears: tuple[str, ...]
    judge: str
    when: str | None = None
    # Modules whose input columns take the fold (x · s) but are not quantized or searched: a
    # MoE router reading the norm's output, or experts left to the RTN fallback.
    also_scale: tuple[str, ...] = ()
    # The module whose input gives the activation statistic (default: linears[0]); a MoE
    # block's experts each see only their routed tokens, the block itself sees them all.
    stat: str | None = None


@dataclass(frozen=True)
class MoESpec:
    """Where a layer keeps its experts. Names are on-disk (and vLLM) tensor names relative to
    the decoder layer: expert e's linears are f"{disk_block}.{experts}.{e}.{linear}"."""

    block: str  # the sparse block's attribute in transformers' decoder layer ("mlp")
    disk_block: str  # its name on disk ("block_sparse_moe" for Mixtral, else == block)
    expert_linears: tuple[str, str, str]  # (gate, up, down) linear names on disk
    num_experts: int
    width: int  # one expert's intermediate width
    experts: str = "experts"
    # The router is not quantized (vLLM builds it with quant_config=None, so exports need not
    # list it: AWQ's modules_to_not_convert matches by substring, and "mlp.gate" would also
    # catch dense layers' mlp.gate_proj); it takes the post-attention norm's AWQ fold.
    router: str | None = "gate"
    shared: str | None = None  # shared-expert MLP, quantized
    shared_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    shared_gate: str | None = None  # Linear(hidden, 1) scaling the shared expert: kept fp

    def expert(self, e: int, which: int) -> str:
        return f"{self.disk_block}.{self.experts}.{e}.{self.expert_linears[which]}"

    def expert_index(self, name: str, which: int) -> int | None:
        """e if `name` is routed expert e's linear number `which` (0 gate, 1 up, 2 down)."""
        head = f"{self.disk_block}.{self.experts}."
        e, _, leaf = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
        return int(e) if e.isdigit() and leaf == self.expert_linears[which] else None


@dataclass(frozen=True)
class ArchSpec:
    """One decoder layer kind as methods see it (quantizer.arch.model.ModelArch.for_layer)."""

    name: str
    layers_prefix: str  # on-disk tensor-name prefix of decoder layers, e.g. "model.layers"
    # Linear modules in execution order, grouped by shared input: every tuple is one input
    # group (one Hessian / one activation statistic); groups run in this order (true-sequential).
    input_groups: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    mlp_gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_down: str = "mlp.down_proj"
    intermediate_key: str = "intermediate_size"
    not_quantized: tuple[str, ...] = ("lm_head",)
    notes: str = field(default="", compare=False)
    # Linears AWQ's clip search leaves alone (None: the q/k suffix rule in methods/awq.py).
    clip_skip: tuple[str, ...] | None = None
    # The layer's mixture-of-experts block, when it has one (its experts are in the groups).
    moe: MoESpec | None = None
    # Probe results shared by every layer of a model (quantizer/arch/folds.py): whether a
    # scale group's fold leaves the float layer's output unchanged, per group signature.
    fold_checks: dict = field(default_factory=dict, compare=False, repr=False)
    # Per producer: how scales fold into it ("scale": w / s; "offset": Gemma's x·(1+w), so
    # (1+w)/s - 1; None: it cannot take a fold), from the norm probe at discovery.
    fold_kinds: tuple[tuple[str, str | None], ...] = field(default=(), compare=False)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)

    def condition(self, when: str | None, config) -> bool:
        if when is None:
            return True
        if when == "v_o_same_width":
            heads = config.num_attention_heads
            kv = getattr(config, "num_key_value_heads", None) or heads
            return kv == heads
        raise ValueError(f"unknown scale-group condition {when!r}")

    def fold_kind(self, prev: str) -> str | None:
        return dict(self.fold_kinds).get(prev, "scale")

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def capture_batches(self, in_features: Callable[[str], int],
                        max_bytes: int | None = None) -> list[list[tuple[str, ...]]]:
        """input_groups cut into batches whose inputs can be captured in one forward: a
        group's input must not depend on another group of the same batch being quantized.
        Dense layers: one group per batch (true-sequential). MoE: consecutive routed-expert
        groups of the same kind (gate/up, or down) read inputs no other expert changes, so
        they share a forward, up to `max_bytes` of float32 Hessians at once."""
        if max_bytes is None:
            max_bytes = EXPERT_BATCH_HESSIAN_BYTES
        batches: list[list[tuple[str, ...]]] = []
        kind = None
        size = 0
        for group in self.input_groups:
            this = self._expert_kind(group[0])
            nbytes = 4 * in_features(group[0]) ** 2
            if this is not None and this == kind and size + nbytes <= max_bytes:
                batches[-1].append(group)
                size += nbytes
            else:
                batches.append([group])
                size = nbytes
            kind = this
        return batches

    def scale_batches(self, expert_tokens, max_tokens: int) -> list[list[ScaleGroup]]:
        """scale_groups in order, cut into batches whose inputs one forward can capture.
        Routed experts' up -> down groups are independent (folding expert e's scales changes
        only expert e's down input), so consecutive ones share a forward -- else a 128-expert
        layer runs 128 partial forwards -- while the tokens routed to them (`expert_tokens`,
        per expert) add up to at most `max_tokens`. Every other group is its own batch."""
        batches: list[list[ScaleGroup]] = []
        used = 0
        after_expert = False
        for group in self.scale_groups:
            e = (self.moe.expert_index(group.judge, 2)
                 if self.moe is not None and expert_tokens is not None else None)
            tokens = 0 if e is None else int(expert_tokens[e])
            if e is not None and after_expert and used + tokens <= max_tokens:
                batches[-1].append(group)
                used += tokens
            else:
                batches.append([group])
                used = tokens
            after_expert = e is not None
        return batches

    def _expert_kind(self, name: str) -> str | None:
        """"gate_up" / "down" for a routed expert's linear, else None."""
        if self.moe is None:
            return None
        if self.moe.expert_index(name, 2) is not None:
            return "down"
        return "gate_up" if any(self.moe.expert_index(name, k) is not None
                                for k in (0, 1)) else None
