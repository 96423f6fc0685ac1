"""Declarative description of a decoder-layer family: what to quantize, in which order, and
which modules share an input. Architecture files only *name* modules; the forward always runs
transformers' own decoder layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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
class ArchSpec:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this spec serves
    layers_prefix: str  # tensor-name prefix of decoder layers, e.g. "model.layers"
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
    # Mixture-of-experts layers (quantizer/arch/moe.py); input_groups / scale_groups above then
    # describe the dense layers, and for_layer() gives a MoE layer's own.
    moe: "MoESpec | None" = None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)

    def condition(self, when: str | None, config) -> bool:
        if when is None:
            return True
        if when == "v_o_same_width":
            # v -> o scaling needs v's output channels to be o's input channels one to one,
            # which breaks under grouped-query attention (v is narrower than o's input).
            heads = config.num_attention_heads
            kv = getattr(config, "num_key_value_heads", None) or heads
            return kv == heads
        raise ValueError(f"unknown scale-group condition {when!r}")

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def is_moe_layer(self, config, index: int) -> bool:
        if self.moe is not None and isinstance(config, dict):
            config = _config_object(config)
        return self.moe is not None and self.moe.is_moe_layer(config, index)

    def for_layer(self, config, index: int, rtn_experts: tuple[int, ...] = ()) -> "ArchSpec":
        """The spec of decoder layer `index` as methods see it: a dense layer's is this one;
        a MoE layer's names every expert linear (minus `rtn_experts`, left to the fallback)."""
        if isinstance(config, dict):
            config = _config_object(config)
        if not self.is_moe_layer(config, index):
            return self
        from .moe import moe_layer_spec
        return moe_layer_spec(self, config, rtn_experts)

    def capture_batches(self, in_features: Callable[[str], int],
                        max_bytes: int | None = None) -> list[list[tuple[str, ...]]]:
        """input_groups cut into batches whose inputs can be captured in one forward: a
        group's input must not depend on another group of the same batch being quantized.
        Dense layers: one group per batch (true-sequential). MoE: consecutive routed-expert
        groups of the same kind (gate/up, or down) read inputs no other expert changes, so
        they share a forward, up to `max_bytes` of float32 Hessians at once."""
        if max_bytes is None:
            from .moe import EXPERT_BATCH_HESSIAN_BYTES as max_bytes
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

    def representative_layers(self, config) -> tuple[int, ...]:
        """One layer index of each kind (dense, MoE) the model has, for shape checks."""
        cfg = _config_object(config) if isinstance(config, dict) else config
        kinds: dict[bool, int] = {}
        for i in range(int(cfg.num_hidden_layers)):
            kinds.setdefault(self.is_moe_layer(cfg, i), i)
        return tuple(sorted(kinds.values()))


def _config_object(d: dict):
    """config.json as transformers reads it (attribute aliases such as Qwen-MoE's
    num_experts <-> num_local_experts resolved the way the model's own code sees them)."""
    import warnings

    from transformers import AutoConfig

    params = {k: v for k, v in d.items() if k not in ("model_type", "quantization_config")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(d["model_type"], **params)


@dataclass(frozen=True)
class MoESpec:
    """Where a family keeps its experts. Names are on-disk (and vLLM) tensor names relative to
    the decoder layer: expert e's linears are f"{disk_block}.{experts}.{e}.{linear}"."""

    block: str  # the sparse block's attribute in transformers' decoder layer ("mlp")
    disk_block: str  # its name on disk ("block_sparse_moe" for Mixtral, else == block)
    expert_linears: tuple[str, str, str]  # (gate, up, down) linear names on disk
    num_experts_key: str  # config key: routed experts per layer
    width_key: str  # config key: one expert's intermediate width
    is_moe_layer: Callable  # (config, layer index) -> bool
    experts: str = "experts"
    # The router is not quantized (vLLM builds it with quant_config=None, so exports need not
    # list it: AWQ's modules_to_not_convert matches by substring, and "mlp.gate" would also
    # catch dense layers' mlp.gate_proj); it takes the post-attention norm's AWQ fold.
    router: str = "gate"
    shared: str | None = None  # shared-expert MLP (gate_proj/up_proj/down_proj), quantized
    shared_gate: str | None = None  # Linear(hidden, 1) scaling the shared expert: kept fp

    def expert(self, e: int, which: int) -> str:
        return f"{self.disk_block}.{self.experts}.{e}.{self.expert_linears[which]}"

    def expert_index(self, name: str, which: int) -> int | None:
        """e if `name` is routed expert e's linear number `which` (0 gate, 1 up, 2 down)."""
        head = f"{self.disk_block}.{self.experts}."
        e, _, leaf = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
        return int(e) if e.isdigit() and leaf == self.expert_linears[which] else None


# The Llama-style dense decoder layer: shared by Llama, Mistral, Qwen2 and Qwen3.
LLAMA_INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               judge="self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), judge="self_attn.o_proj",
               when="v_o_same_width"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), judge="mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), judge="mlp.down_proj"),
)
