"""Mixtral: the Mistral attention and a sparse block of `num_local_experts` SwiGLU experts.
transformers 5 keeps the block at `mlp` with experts fused into 3-D parameters; on disk (and in
vLLM) it is `block_sparse_moe`, expert e being `experts.e.w1` (gate), `w3` (up), `w2` (down)."""
from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec, MoESpec

SPEC = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    moe=MoESpec(block="mlp", disk_block="block_sparse_moe", expert_linears=("w1", "w3", "w2"),
                num_experts_key="num_local_experts", width_key="intermediate_size",
                is_moe_layer=lambda config, index: True),
    notes="Mixtral: every layer sparse; experts stored per expert on disk as w1/w3/w2.",
)
