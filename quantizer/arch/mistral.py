"""Mistral: the Llama layer with sliding-window attention (mask comes from transformers)."""
from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec

SPEC = ArchSpec(
    name="mistral",
    model_types=("mistral",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    notes="Mistral: the Llama layer with sliding-window attention (mask comes from transformers).",
)
