"""Llama 1/2/3: RMSNorm, RoPE, SwiGLU, optional GQA, no biases."""
from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec

SPEC = ArchSpec(
    name="llama",
    model_types=("llama",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    notes="Llama 1/2/3: RMSNorm, RoPE, SwiGLU, optional GQA, no biases.",
)
