"""What discovery cannot decide, per model family: small overrides, each saying why.

Everything else about a family -- its linears, their order, shared inputs, AWQ groups, experts,
which layers are sparse, the widths -- is read off transformers' own modules
(quantizer/arch/discover.py). A family listed with `refused` is turned away before any work
with that reason; a family not listed at all is tried by discovery alone. Model types that
transformers builds from another family's config (Kimi-K2) are meta.py's ALIASES, resolved
where config.json is read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from .meta import text_config


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
    # config -> reason or None: refusals that depend on the config (a feature some sizes of
    # the family use and others do not)
    refuse_if: Callable | None = None
    # The config key of the dense MLP width when no "*intermediate_size" key holds it.
    width_key: str = "intermediate_size"

    def adjust(self, spec, found, config):
        return self.override(spec, found, config) if self.override else spec

    def refusal(self, config) -> str | None:
        if self.refused:
            return self.refused
        return self.refuse_if(config) if self.refuse_if else None


def _per_layer_inputs(config) -> str | None:
    # Gemma 3n / Gemma 4's small variants feed every decoder layer a second, token-dependent
    # input (per-layer token embeddings) and let later layers reuse earlier layers' KV cache:
    # a layer is then no function of its hidden states alone, which layer-by-layer
    # quantization streams. Sizes without either are quantized like any other family.
    text = text_config(config)
    if getattr(text, "hidden_size_per_layer_input", 0):
        return ("its decoder layers read per-layer token embeddings besides the hidden states "
                "(hidden_size_per_layer_input > 0); layerquant streams one hidden-state tensor "
                "from layer to layer")
    if getattr(text, "num_kv_shared_layers", 0):
        return ("later decoder layers reuse earlier layers' key/value cache "
                "(num_kv_shared_layers > 0), so a layer cannot run alone")
    return None


_DSA_INDEXER = ("self_attn.indexer.wq_b", "self_attn.indexer.wk",
                "self_attn.indexer.weights_proj")

_FUSED_ON_DISK = (
    "its checkpoints store every layer's experts fused as 3-D tensors ({}); vLLM loads "
    "quantized experts per expert, under names the original checkpoint does not have, and "
    "{}")

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
    # Qwen3.5's Gated DeltaNet splits Qwen3-Next's in_proj_ba into in_proj_b and in_proj_a:
    # one number per value head each (beta, decay step), kept for the same reasons.
    *(Family(t, "Qwen3.5: Gated DeltaNet and gated full attention layers.",
             kept_in_layers=("linear_attn.in_proj_a", "linear_attn.in_proj_b"))
      for t in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")),
    # DeepSeek sparse attention's indexer (a small network scoring every key, whose top-k the
    # attention then reads) stays in high precision: an error there changes which keys are
    # seen at all, and transformers reads weights_proj's weight directly (its dtype). AXK2
    # carries the same indexer under the same names.
    *(Family(t, kept_in_layers=_DSA_INDEXER) for t in ("deepseek_v32", "glm_moe_dsa",
                                                        "axk2")),
    *(Family(t, refuse_if=_per_layer_inputs) for t in (
        "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
        "gemma4_unified_text")),
    Family("mllama", refused="its text decoder interleaves cross-attention layers that read "
                             "the image encoder's states; text calibration never runs them"),
    Family("gpt_oss", refused=_FUSED_ON_DISK.format(
        "gate_up_proj with gate and up interleaved, and their biases",
        "its experts compute a clamped, biased GLU (x * sigmoid(1.702 x) * (up + 1)) that no "
        "per-expert SwiGLU reproduces; its attention sinks and router would be kept")),
    *(Family(t, refused=_FUSED_ON_DISK.format(
        "feed_forward.experts.gate_up_proj (E, H, 2I)",
        "the interleaved dense / MoE layers and the shared expert would be quantized as "
        "discovered")) for t in ("llama4", "llama4_text")),
)}


def family_for(model_type: str) -> Family:
    return FAMILIES.get(model_type) or Family(model_type)


def refuse_stated(model_type: str) -> None:
    """InputError when the family is refused whatever its config says (checked first, before
    any number of config.json is read: gpt-oss is refused as gpt-oss, not for a missing key)."""
    refused = family_for(model_type).refused
    if refused:
        raise InputError(f"unsupported architecture {model_type!r}: {refused}")


def width_key(family: Family) -> str:
    return family.width_key

