"""Checkpoints in the layouts people publish already quantized (quantizer/originals.py reads
them): a float checkpoint converted tensor by tensor, or random weights generated straight
into the quantized layout on any device (the DeepSeek-V3-width benchmark writes ~25 GB of FP8
this way on the GPU box without ever holding a float layer on the host).

Formats (`FORMATS`):
  fp8-block        DeepSeek-V3 / Qwen3-FP8: float8 e4m3 weight + float32 weight_scale_inv per
                   128x128 block, quantization_config {"quant_method": "fp8", ...}
  ct-fp8-tensor    compressed-tensors float-quantized, one scale per tensor
  ct-fp8-channel   ... one scale per output channel
  ct-fp8-block     ... 128x128 blocks (what llm-compressor's FP8_BLOCK writes)
  ct-int4          compressed-tensors pack-quantized INT4, symmetric, group 32 (Kimi-K2-Thinking)
  ct-int4-asym     ... asymmetric (zero points packed along the output dimension)
  ct-int4-gidx     ... symmetric with act-order groups (weight_g_idx)
The quantized tensors are every decoder-layer linear the family's spec names (attention, MLP,
every expert); embeddings, norms, routers and the head stay as they were, as in the published
checkpoints."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import model_arch
from ..export.writer import ShardWriter
from ..kernels.packing import QuantizedWeight, ct_pack_linear
from ..stream.originals import E2M1
from .synthetic import _NUM_EXPERTS_KEY, meta_model

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest float8 e4m3fn value
FORMATS = ("fp8-block", "ct-fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-int4",
           "ct-int4-asym", "ct-int4-gidx")
CT_INT4_GROUP = 32


def quantization_config(fmt: str, block: int = 128) -> dict:
    """config.json's quantization_config for `fmt`, as the published checkpoints write it."""
    if fmt == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block, block]}
    if fmt.startswith("ct-fp8"):
        strategy = fmt.rsplit("-", 1)[1]
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": strategy, "group_size": None,
                   "block_structure": [block, block] if strategy == "block" else None}
        return _ct("float-quantized", weights, {"num_bits": 8, "type": "float",
                                                "strategy": "token", "dynamic": True,
                                                "symmetric": True})
    if fmt.startswith("ct-int4"):
        weights = {"num_bits": 4, "type": "int", "symmetric": fmt != "ct-int4-asym",
                   "dynamic": False, "strategy": "group", "group_size": CT_INT4_GROUP,
                   "actorder": "group" if fmt == "ct-int4-gidx" else None}
        return _ct("pack-quantized", weights, None)
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def _ct(fmt: str, weights: dict, inputs: dict | None) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": inputs}},
            "kv_cache_scheme": None, "sparsity_config": {}}


# ---------------------------------------------------------------------- one weight


def fp8_scaled(w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (float8 e4m3 codes, float32 scale per rows x cols cell): scale =
    amax / 448 over the cell, code = w / scale (the DeepSeek-V3 recipe; cells at the
    edges are smaller when the block does not divide the weight)."""
    out_f, in_f = w.shape
    nr, nc = -(-out_f // rows), -(-in_f // cols)
    padded = torch.zeros((nr * rows, nc * cols), dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    cells = padded.reshape(nr, rows, nc, cols)
    scale = (cells.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (cells / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(nr * rows, nc * cols)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def int4_packed(w: torch.Tensor, fmt: str, gen: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
    """w (out, in) -> compressed-tensors pack-quantized INT4 tensors (group CT_INT4_GROUP)."""
    w = w.float()
    out_f, in_f = w.shape
    g = CT_INT4_GROUP
    g_idx = None
    if fmt == "ct-int4-gidx":  # act-order: a permutation of the columns, groups of g in it
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // g).to(torch.int32)
    group = (torch.arange(in_f) // g) if g_idx is None else g_idx.long()
    n_groups = in_f // g
    cols = [w[:, group == k] for k in range(n_groups)]
    if fmt == "ct-int4-asym":
        lo = torch.stack([c.amin(dim=1) for c in cols], 1).clamp(max=0)
        hi = torch.stack([c.amax(dim=1) for c in cols], 1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        zeros = torch.round(-lo / scale).clamp(0, 15)
    else:
        amax = torch.stack([c.abs().amax(dim=1) for c in cols], 1)
        scale = (amax / 7).clamp(min=1e-8).half().float()
        zeros = torch.full_like(scale, 8)
    codes = torch.round(w / scale[:, group] + zeros[:, group]).clamp(0, 15)
    q = QuantizedWeight(codes.to(torch.uint8), scale.half(), zeros.to(torch.int32), 4,
                        g, g_idx, symmetric=fmt != "ct-int4-asym")
    return ct_pack_linear(q)


def quantize_weight(w: torch.Tensor, fmt: str, block: int = 128,
                    gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stored tensors (suffixes relative to the linear) of one weight in `fmt`."""
    if fmt == "fp8-block":
        q, s = fp8_scaled(w, block, block)
        return {"weight": q, "weight_scale_inv": s}
    if fmt.startswith("ct-fp8"):
        out_f, in_f = w.shape
        cell = {"tensor": (out_f, in_f), "channel": (1, in_f),
                "block": (block, block)}[fmt.rsplit("-", 1)[1]]
        q, s = fp8_scaled(w, *cell)
        if fmt == "ct-fp8-tensor":
            s = s.reshape(1)
        return {"weight": q, "weight_scale": s.to(torch.bfloat16 if fmt != "ct-fp8-block"
                                                   else torch.float32)}
    if fmt.startswith("ct-int4"):
        return int4_packed(w, fmt, gen)
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


# ------------------------------------------------------------------- checkpoints


def quantized_linears(config: dict) -> set[str]:
    """Full weight names of every decoder-layer linear the family's spec names."""
    arch = model_arch(config)
    names: set[str] = set()
    for i in range(arch.num_layers):
        spec = arch.for_layer(None, i)
        names.update(f"{arch.layer_prefix(i)}.{lin}.weight" for lin in spec.linears)
    return names


def convert_checkpoint(src, out, fmt: str, block: int = 128, seed: int = 0,
                       max_shard_bytes: int = 1 << 30) -> Path:
    """The float checkpoint `src` rewritten in `fmt` (tensor by tensor; config.json gets the
    format's quantization_config). Every other file is left behind."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    targets = quantized_linears(config)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name in targets:
                    base = name[:-len("weight")]
                    writer.add({base + k: v for k, v in
                                quantize_weight(t, fmt, block, gen).items()})
                else:
                    writer.add({name: t})
    writer.finish()
    config["quantization_config"] = quantization_config(fmt, block)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def write_generated(out, config, fmt: str = "fp8-block", device="cpu", std: float = 0.02,
                    seed: int = 0, block: int = 128, max_shard_bytes: int = 5 << 30,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Random weights of `config` (a transformers config) written straight in `fmt`: each
    tensor is drawn on `device`, quantized there and only its stored form reaches the host.
    Norms are 1, everything else N(0, std); the plain tensors are in `dtype`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = meta_model(config)  # per-expert linears under their on-disk names
    cfg = config.to_dict()
    key = _NUM_EXPERTS_KEY.get(config.model_type)
    if key is not None:
        cfg[key] = getattr(config, key)
    targets = quantized_linears(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    for name, p in model.state_dict(keep_vars=True).items():
        if getattr(config, "tie_word_embeddings", False) and name.endswith("lm_head.weight"):
            continue
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            t = torch.ones(p.shape, device=device)
        else:
            t = torch.randn(p.shape, generator=gen, device=device) * std
        if name in targets:
            base = name[:-len("weight")]
            writer.add({base + k: v.cpu() for k, v in quantize_weight(t, fmt, block).items()})
        else:
            writer.add({name: t.to(dtype).cpu()})
        if name.endswith("down_proj.weight") and ".experts." not in name:
            log.info("written through %s", name)
    writer.finish()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("dtype", None)
    cfg["quantization_config"] = quantization_config(fmt, block)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


# ------------------------------------------------------------------------ MXFP4


def mxfp4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, in, out) as transformers' GptOss experts hold it -> (blocks (E, out, in/32, 16)
    uint8, scales (E, out, in/32) uint8): per 32 inputs an e8m0 exponent (biased by 127)
    with the largest value at most 6 * 2^e, codes rounded to the nearest e2m1 value."""
    rows = w.transpose(1, 2).float()  # (E, out, in)
    e, out_f, in_f = rows.shape
    groups = rows.reshape(e, out_f, in_f // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    values = torch.tensor(E2M1[:8])
    mag = (scaled.abs().unsqueeze(-1) - values).abs().argmin(dim=-1)  # code 0..7
    codes = (mag + 8 * (scaled < 0).long()).to(torch.uint8)
    codes = codes.reshape(e, out_f, in_f // 32, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()
