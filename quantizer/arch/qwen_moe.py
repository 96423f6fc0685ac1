"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention, and on sparse layers `num_experts`
routed SwiGLU experts at `mlp.experts.e.{gate,up,down}_proj` (transformers 5 fuses them in
memory; on disk they are per expert). Qwen2-MoE adds an always-on shared expert scaled by a
sigmoid gate. Dense layers (mlp_only_layers, decoder_sparse_step) keep the Llama MLP."""
from dataclasses import replace

from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec, MoESpec


def is_sparse_layer(config, index: int) -> bool:
    # transformers' own rule (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer.__init__)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (index not in (getattr(config, "mlp_only_layers", None) or ())
            and getattr(config, "num_experts", 0) > 0 and (index + 1) % step == 0)


_EXPERTS = ("gate_proj", "up_proj", "down_proj")

QWEN2_MOE = ArchSpec(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    moe=MoESpec(block="mlp", disk_block="mlp", expert_linears=_EXPERTS,
                num_experts_key="num_experts", width_key="moe_intermediate_size",
                is_moe_layer=is_sparse_layer, shared="shared_expert",
                shared_gate="shared_expert_gate"),
    notes="Qwen2-MoE: routed experts + a sigmoid-gated shared expert; q/k/v biases kept fp.",
)

# The same layer without the shared expert.
QWEN3_MOE = replace(
    QWEN2_MOE, name="qwen3_moe", model_types=("qwen3_moe",),
    moe=replace(QWEN2_MOE.moe, shared=None, shared_gate=None),
    notes="Qwen3-MoE: routed experts, no shared expert; per-head q/k norms in attention.",
)
