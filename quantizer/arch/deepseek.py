"""DeepSeek-V3 style: multi-head latent attention (q and kv squeezed through low-rank
projections with their own RMSNorms) and, from layer `first_k_dense_replace` on, routed experts
plus `n_shared_experts` always-on experts fused into one `shared_experts` MLP. The router
(sigmoid scores, a score-correction bias, group-limited top-k) is kept in high precision."""
from .base import ArchSpec, MoESpec, ScaleGroup

MLA_INPUT_GROUPS = (
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),  # both read the normed hidden
    ("self_attn.q_b_proj",),  # reads q_a_layernorm's output
    ("self_attn.kv_b_proj",),  # reads kv_a_layernorm's output (the rope part bypasses it)
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
MLA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
               judge="self_attn"),
    ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), judge="self_attn.q_b_proj"),
    ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",),
               judge="self_attn.kv_b_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), judge="mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), judge="mlp.down_proj"),
)


def is_sparse_layer(config, index: int) -> bool:
    # transformers' DeepseekV3DecoderLayer: dense MLP below first_k_dense_replace
    return index >= (getattr(config, "first_k_dense_replace", 0) or 0)


SPEC = ArchSpec(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    layers_prefix="model.layers",
    input_groups=MLA_INPUT_GROUPS,
    scale_groups=MLA_SCALE_GROUPS,
    moe=MoESpec(block="mlp", disk_block="mlp", expert_linears=("gate_proj", "up_proj",
                                                                "down_proj"),
                num_experts_key="n_routed_experts", width_key="moe_intermediate_size",
                is_moe_layer=is_sparse_layer, shared="shared_experts"),
    notes="DeepSeek-V3: MLA attention (q_lora_rank set), dense first layers, routed + shared "
          "experts.",
)
