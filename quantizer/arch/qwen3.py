"""Qwen3: the Llama layer with per-head q/k RMSNorm inside attention (not scaled)."""
from .base import LLAMA_INPUT_GROUPS, LLAMA_SCALE_GROUPS, ArchSpec

SPEC = ArchSpec(
    name="qwen3",
    model_types=("qwen3",),
    layers_prefix="model.layers",
    input_groups=LLAMA_INPUT_GROUPS,
    scale_groups=LLAMA_SCALE_GROUPS,
    notes="Qwen3: the Llama layer with per-head q/k RMSNorm inside attention (not scaled).",
)
