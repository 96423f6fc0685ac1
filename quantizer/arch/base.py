"""Declarative description of a decoder-layer family: what to quantize, in which order, and
which modules share an input. Architecture files only *name* modules; the forward always runs
transformers' own decoder layer."""
from __future__ import annotations

from dataclasses import dataclass, field


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
