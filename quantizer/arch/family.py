"""What discovery cannot decide, per model family: small overrides, each saying why.

Everything else about a family -- its linears, their order, shared inputs, AWQ groups, experts,
which layers are sparse, the widths -- is read off transformers' own modules
(quantizer/arch/discover.py). A family listed with `refused` is turned away before any work
with that reason; a family not listed at all is tried by discovery alone."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class Family:
    model_type: str
    notes: str = ""
    # Why this family is refused (None: supported as far as discovery goes).
    refused: str | None = None
    # Linears inside the decoder layers kept in high precision, by name as vLLM sees them
    # (listed in modules_to_not_convert / ignore), and why.
    kept_in_layers: tuple[str, ...] = ()
    # spec -> spec: the override itself (None: discovery's spec as it is).
    override: Callable | None = None
    # The config key of the dense MLP width when no "*intermediate_size" key holds it.
    width_key: str = "intermediate_size"

    def adjust(self, spec, found, config):
        return self.override(spec, found, config) if self.override else spec


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama 1/2/3: RMSNorm, RoPE, SwiGLU, optional GQA, no biases."),
    Family("mistral", "Mistral: the Llama layer with sliding-window attention."),
    Family("qwen2", "Qwen2/2.5: the Llama layer with q/k/v biases (kept in high precision)."),
    Family("qwen3", "Qwen3: the Llama layer with per-head q/k RMSNorm inside attention."),
    Family("mixtral", "Mixtral: every layer sparse; experts stored per expert on disk as "
                      "w1/w3/w2."),
    Family("qwen2_moe", "Qwen2-MoE: routed experts + a sigmoid-gated shared expert."),
    Family("qwen3_moe", "Qwen3-MoE: routed experts, no shared expert."),
    Family("deepseek_v3", "DeepSeek-V3: MLA attention, dense first layers, routed + shared "
                          "experts."),
    # Gated DeltaNet layers: in_proj_ba writes two numbers per value head (beta and the decay
    # step), 64 rows on Qwen3-Next-80B: 16 per GPU at TP 4, below Marlin's 64-row minimum, and
    # Qwen's own FP8 release keeps it unquantized (vLLM builds it apart from in_proj_qkvz for
    # that). conv1d, A_log and dt_bias are parameters, not linears: kept as they are.
    Family("qwen3_next", "Qwen3-Next: Gated DeltaNet and gated full attention layers, MoE with "
                         "a shared expert.", kept_in_layers=("linear_attn.in_proj_ba",)),
)}


def family_for(model_type: str) -> Family:
    return FAMILIES.get(model_type) or Family(model_type)


def width_key(family: Family) -> str:
    return family.width_key


def with_family(family: Family, **changes) -> Family:
    return replace(family, **changes)
