"""Random-weight checkpoints of real architectures, written shard by shard without ever
building the model in memory: test models here, and 7B/70B-width benchmark models on a GPU box
that has no hub access."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..arch.meta import decoder_layers
from ..arch.model import apply_renames, layer_renames, prepare_layer
from ..arch.names import NameMap
from ..export.writer import ShardWriter

# Small shapes for tests: 2 layers, GQA 4/2, widths that every group size divides.
_TINY: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, num_hidden_layers=2)

# Published shapes (config.json values) for benchmark checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      num_hidden_layers=32),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      num_hidden_layers=32, rope_theta=500000.0),
    "llama2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       num_hidden_layers=80),
    "tiny-llama": dict(_TINY, model_type="llama"),
    "tiny-mistral": dict(_TINY, model_type="mistral", sliding_window=64),
    "tiny-qwen2": dict(_TINY, model_type="qwen2"),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", head_dim=32),
    # MoE, written with per-expert tensors under their on-disk names. Benchmark widths are
    # cut to a few layers with num_hidden_layers=... at write time.
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                         rope_theta=1e6),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, rope_theta=1e6),
    "tiny-mixtral": dict(_TINY, model_type="mixtral", intermediate_size=64,
                         num_local_experts=4, num_experts_per_tok=2),
    "tiny-qwen2-moe": dict(_TINY, model_type="qwen2_moe", moe_intermediate_size=64,
                           shared_expert_intermediate_size=128, num_experts=4,
                           num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "tiny-qwen3-moe": dict(_TINY, model_type="qwen3_moe", head_dim=32, moe_intermediate_size=64,
                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                           decoder_sparse_step=1, mlp_only_layers=[]),
    # DeepSeek-V3 style: MLA attention, layer 0 dense, layer 1 routed + shared experts.
    "tiny-deepseek": dict(_TINY, model_type="deepseek_v3", num_key_value_heads=4,
                          q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                          qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4,
                          num_experts_per_tok=2, n_group=1, topk_group=1,
                          moe_intermediate_size=64, n_shared_experts=1,
                          first_k_dense_replace=1, rope_scaling=None),
}


# config.json key real checkpoints of these families use for the number of routed experts
_NUM_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts",
                    "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def make_config(model_type: str, **overrides):
    from transformers import AutoConfig

    base = dict(max_position_embeddings=4096, tie_word_embeddings=False)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def meta_model(config):
    """The model of `config` on the meta device with its layers' linears under their on-disk
    names (MoE: per-expert linears instead of transformers' fused parameters; arch/model.py),
    and the NameMap between memory and disk names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    names = NameMap(model)
    path, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        prepare_layer(layer, names)
        apply_renames(layer, layer_renames(layer, f"{path}.{i}", names))
    return model, names


def write_checkpoint(out, config=None, preset: str | None = None, dtype=torch.float16,
                     seed: int = 0, std: float = 0.02, max_shard_bytes: int = 1 << 30,
                     outlier_channels: int = 0, device: str = "cpu", **overrides) -> Path:
    """Write a random checkpoint of `config` (or a preset with overrides) to `out`.

    Weights ~ N(0, std); norms = 1. `outlier_channels` > 0 gives that many hidden channels a
    large norm weight, so activations carry outliers as real LLMs' do (AWQ tests use it).
    device="cuda" draws the weights there (other values than on the CPU for the same seed;
    a 7B-width 32-layer benchmark checkpoint in seconds instead of a minute)."""
    if config is None:
        params = dict(PRESETS[preset]) if preset else {}
        params.update(overrides)
        config = make_config(params.pop("model_type"), **params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, names = meta_model(config)
    gen = torch.Generator().manual_seed(seed)
    draw = gen if device == "cpu" else torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    outliers = torch.randperm(config.hidden_size, generator=gen)[:outlier_channels]
    # Parameters and persistent buffers (DeepSeek's router score-correction bias).
    for name, p in model.state_dict(keep_vars=True).items():
        if tied and name.endswith("lm_head.weight"):
            continue
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            t = torch.ones(p.shape)
            if outlier_channels and t.shape[0] == config.hidden_size and "layernorm" in name:
                t[outliers] = 20.0
        else:  # weights and biases
            t = torch.randn(p.shape, generator=draw, device=device) * std
        writer.add({names.to_disk(name): t.to(dtype).cpu()})
    writer.finish()
    cfg = config.to_dict()
    key = _NUM_EXPERTS_KEY.get(config.model_type)
    if key is not None:  # the key real checkpoints use (to_dict may write only an alias)
        cfg[key] = getattr(config, key)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out
