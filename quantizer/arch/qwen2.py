"""Qwen2/2.5: the Llama layer with q/k/v biases (biases stay in high precision)."""
from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec

SPEC = ArchSpec(
    name="qwen2",
    model_types=("qwen2",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    notes="Qwen2/2.5: the Llama layer with q/k/v biases (biases stay in high precision).",
)
