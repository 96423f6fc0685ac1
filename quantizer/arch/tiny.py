"""Tiny random checkpoints of any family transformers knows: its default config with every
width shrunk (hidden 64, 4 heads of 16, MLP 128, 4 experts of 64, ...) and just enough layers
to hold one of each layer kind, built by transformers, randomised, and written with
`save_pretrained` -- so the tensor names are the ones transformers writes on disk.

The family zoo (tests/test_family_zoo.py, benchmarks/family_zoo.py) runs every family of
transformers' causal-LM and image-text-to-text mappings through this."""
from __future__ import annotations

import inspect
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from .meta import config_from_dict, model_class

log = logging.getLogger(__name__)

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
MLP = 128
EXPERT_MLP = 64
EXPERTS = 4
VOCAB = 512
MAX_LAYERS = 8

# exact keys -> tiny values (text model)
_TEXT = {
    "hidden_size": HIDDEN, "num_attention_heads": HEADS, "head_dim": HEAD_DIM,
    "intermediate_size": MLP, "moe_intermediate_size": EXPERT_MLP,
    "shared_expert_intermediate_size": MLP, "ffn_hidden_size": MLP, "vocab_size": VOCAB,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "first_k_dense_replace": 1, "max_position_embeddings": 512,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "sliding_window": 16, "attention_chunk_size": 16,
    "global_head_dim": 16, "num_global_key_value_heads": 2, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8, "altup_num_inputs": 2,
    "intermediate_size_mlp": MLP, "expert_intermediate_size": EXPERT_MLP,
}
# set even where the default config leaves them None (the model code needs a number)
_EVEN_IF_UNSET = ("n_group", "topk_group", "head_dim", "num_experts_per_tok", "n_routed_experts",
                  "moe_intermediate_size", "n_shared_experts")
# vision towers and projectors: never run by the quantizer, built and saved all the same
_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "depth": 1,
    "num_attention_heads": 2, "num_heads": 2, "embed_dim": 32, "num_layers": 1,
    "projection_dim": 32, "vision_output_dim": 32, "hidden_act_dim": 32,
}
_TO_TEXT_HIDDEN = ("out_hidden_size", "text_hidden_size", "output_hidden_size",
                   "projector_hidden_size", "text_config_hidden_size")


def all_families() -> list[str]:
    """Every model type of transformers' causal-LM and image-text-to-text mappings."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
                  | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def _layers(d: dict, key: str = "num_hidden_layers") -> int:
    """Layers enough to hold one of each kind of the default config's pattern."""
    n = int(d.get(key) or 2)
    firsts = [1]
    for types in d.values():  # per-layer lists: layer_types, mlp_layer_types, ...
        if isinstance(types, list) and len(types) == n and all(
                isinstance(t, (str, int, bool)) for t in types):
            firsts += [types.index(t) for t in dict.fromkeys(types)]
    for k, v in d.items():  # lists of layer indices (cross_attention_layers, ...)
        if k.endswith("_layers") and isinstance(v, list) and v and all(
                isinstance(i, int) and not isinstance(i, bool) for i in v) and len(v) < n:
            firsts.append(min(v))
    for key in ("full_attention_interval", "interleave_moe_layer_step", "decoder_sparse_step",
                "sliding_window_pattern", "attn_layer_period", "expert_layer_period"):
        v = d.get(key)
        if isinstance(v, int) and 0 < v <= MAX_LAYERS:
            firsts.append(v - 1)
    return max(2, min(n, max(firsts) + 1, MAX_LAYERS))


def _shrink_text(d: dict, multimodal_rope: bool = False, aliases: dict | None = None) -> dict:
    """`aliases`: {the config's own key: transformers' common name} (GPT-J's n_embd is
    hidden_size) from the config class's attribute_map."""
    d = dict(d)
    aliases = aliases or {}
    key = next((k for k, c in aliases.items() if c == "num_hidden_layers" and k in d),
               "num_hidden_layers")
    old_layers = int(d.get(key) or 0)
    n = _layers(d, key)
    mha = d.get("num_key_value_heads") in (None, d.get("num_attention_heads"))
    for k, v in list(d.items()):
        if isinstance(v, bool):
            continue
        common = aliases.get(k, k)
        if common in _TEXT and (isinstance(v, int) or v is None and common in _EVEN_IF_UNSET):
            d[k] = _TEXT[common]
        elif isinstance(v, list) and old_layers and len(v) == old_layers:
            d[k] = v[:n]  # per-layer lists (layer_types, ...)
        elif isinstance(v, dict) and v and all(str(i).isdigit() for i in v):
            d[k] = {i: x for i, x in v.items() if int(i) < n}  # per-layer settings
    if "num_key_value_heads" in d and d["num_key_value_heads"] is not None:
        d["num_key_value_heads"] = HEADS if mha else 2
    for k in ("mlp_only_layers",):
        if isinstance(d.get(k), list):
            d[k] = [i for i in d[k] if i < n]
    if d.get("num_kv_shared_layers"):
        # the last layers reuse earlier layers' KV cache (Gemma 3n/4): a count kept from the
        # full depth leaves a layer kind with no earlier layer to reuse, so the few tiny
        # layers share none (the refusal of shared KV reads the published config)
        d["num_kv_shared_layers"] = 0
    d[key] = n
    for rope_key in ("rope_scaling", "rope_parameters"):
        rope = d.get(rope_key)
        if isinstance(rope, dict) and (multimodal_rope or "mrope_section" in rope):
            # multimodal rope splits the rotary half-width into sections (Qwen2-VL's code
            # defaults to [16, 24, 24] for 128 when the config has none)
            sec = rope.get("mrope_section") or [16, 24, 24]
            factor = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
            half = int(HEAD_DIM * factor) // 2
            scaled = [max(1, round(x * half / sum(sec))) for x in sec]
            scaled[-1] += half - sum(scaled)
            d[rope_key] = {**rope, "mrope_section": scaled}
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(k), int) and d[k] >= VOCAB:
            d[k] = None if k == "pad_token_id" else VOCAB - 1
    d["tie_word_embeddings"] = False
    return d


def _shrink_vision(d: dict, text_hidden: int) -> dict:
    d = dict(d)
    for k, v in list(d.items()):
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if k in _VISION:
            d[k] = _VISION[k]
        elif k in _TO_TEXT_HIDDEN:
            d[k] = text_hidden
    return d


def _uses_mrope(model_type: str) -> bool:
    """Whether the family's model code splits its rotary table into multimodal sections."""
    try:
        cls = model_class(config_from_dict({"model_type": model_type}))
        return "mrope_section" in inspect.getsource(sys.modules[cls.__module__])
    except Exception:  # noqa: BLE001 -- no class, no source: no sections to fit
        return False


def tiny_config(model_type: str, **overrides):
    """transformers' default config of `model_type`, shrunk (then `overrides` set on its text
    config); InputError if it does not build."""
    default = config_from_dict({"model_type": model_type})
    base = default.to_dict()
    text_default = getattr(default, "text_config", None) or default
    aliases = {v: k for k, v in getattr(type(text_default), "attribute_map", {}).items()}
    text_key = next((k for k in ("text_config", "language_config", "llm_config")
                     if isinstance(base.get(k), dict)), None)
    if text_key:
        base[text_key] = _shrink_text(base[text_key], multimodal_rope=_uses_mrope(model_type),
                                      aliases=aliases)
        for k, v in list(base.items()):
            if isinstance(v, dict) and k != text_key and ("hidden_size" in v or "depth" in v):
                base[k] = _shrink_vision(v, HIDDEN)
        for k in _TO_TEXT_HIDDEN:
            if isinstance(base.get(k), int):
                base[k] = HIDDEN
        base["tie_word_embeddings"] = False
    else:
        base = _shrink_text(base, aliases=aliases)
    base.pop("architectures", None)
    target = base[text_key] if text_key else base
    target.update(overrides)
    return config_from_dict(base)


@torch.no_grad()
def write_tiny(model_type: str, out, seed: int = 0, overrides: dict | None = None,
               config_json: dict | None = None) -> Path:
    """A tiny random checkpoint of `model_type` in `out` (float32, safetensors, as
    transformers' save_pretrained writes it); `overrides` change the tiny config before the
    model is built, `config_json` the written config.json after (a family that publishes
    another's architecture under its own model_type)."""
    cfg = tiny_config(model_type, **(overrides or {}))
    cls = model_class(cfg)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls._from_config(cfg, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 -- reported as the family's reason
            raise InputError(f"the tiny {model_type} config does not build: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:150]}") from None
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1:  # norms and biases: away from their init, so folds are exercised
            p.add_(0.1 * noise)
        else:
            p.copy_(0.05 * noise)
    model.eval()
    out = Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out, safe_serialization=True)
    if config_json:
        written = json.loads((out / "config.json").read_text())
        written.update(config_json)
        (out / "config.json").write_text(json.dumps(written, indent=2))
    return out
