"""torch's built-in int4 GEMM ("tinygemm": `torch.ops.aten._weight_int4pack_mm`) as one more
path of the kernel dispatch, used only where it computes our function exactly.

tinygemm dequantizes W = (q - 8) * scale + zero' with a float zero'. Our asymmetric
W = (q - z) * s is the same function with zero' = (8 - z) * s, so one (K/G, N, 2) tensor of
[s, (8 - z) * s] in the activation dtype carries it. Conditions (checked by `eligible`):
4-bit codes, contiguous groups of 32, 64, 128 or 256 (act-order whose groups become
contiguous after the input permutation qualifies; a free-form g_idx does not), K a multiple
of 16 * inner_k_tiles, N a multiple of 8, and an activation dtype the installed torch's CUDA
kernel accepts (torch 2.11 takes bfloat16 only; `accepts` probes once per dtype and device).
The codes go to tinygemm's uint8 input with the even input in the high nibble.

The packed form costs K * N / 2 bytes beside our own layout; the dispatch builds it only
while timing it and keeps it only where tinygemm was chosen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8  # 16-byte loads of the packed weight (2, 4 or 8 allowed)
_ACCEPTS: dict[tuple, bool] = {}
REFUSALS: dict[tuple, str] = {}  # (device, dtype) -> torch's first error line, when refused


@dataclass
class TinyGemmWeight:
    weight: torch.Tensor  # int32 (N/8, K/(16*inner), 32, inner/2), tinygemm's layout
    scales_zeros: torch.Tensor  # (K/G, N, 2) activation dtype: [s, (8 - z) * s]
    group_size: int


def available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm") and hasattr(ops, "_convert_weight_to_int4pack")


def eligible(kw, dtype: torch.dtype) -> bool:
    """Shape/format conditions (not the device's dtype support: see `accepts`)."""
    return (available() and kw.bits == 4 and kw.g_idx is None
            and kw.group_size in GROUP_SIZES and kw.in_features % (16 * INNER_K_TILES) == 0
            and kw.out_features % 8 == 0 and dtype in (torch.float16, torch.bfloat16))


def scales_zeros(scales_gn: torch.Tensor, zeros_gn: torch.Tensor, dtype: torch.dtype):
    """(G, N) scales and integer zeros -> tinygemm's (G, N, 2) [s, (8 - z) * s] in dtype
    (computed in float32, rounded once)."""
    s = scales_gn.float()
    return torch.stack([s, (8.0 - zeros_gn.float()) * s], dim=2).to(dtype).contiguous()


def pack_codes(codes_nk: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> tinygemm's (N, K/2) uint8 input, even input in the high nibble."""
    c = codes_nk.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def build(kw, dtype: torch.dtype) -> TinyGemmWeight:
    """tinygemm's form of a KernelWeight (codes in kernel input order, i.e. after `perm`)."""
    codes = kw.codes_nk()
    with torch.cuda.device(kw.device):
        packed = torch.ops.aten._convert_weight_to_int4pack(pack_codes(codes), INNER_K_TILES)
    return TinyGemmWeight(packed, scales_zeros(kw.scales, kw.zeros, dtype), kw.group_size)


def matmul(x2: torch.Tensor, tg: TinyGemmWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm(x2, tg.weight, tg.group_size, tg.scales_zeros)
    return y.add_(bias) if bias is not None else y


def accepts(kw, dtype: torch.dtype) -> bool:
    """Does this torch's CUDA tinygemm run `dtype` activations? (probed once per device)"""
    key = (str(kw.device), dtype)
    if key not in _ACCEPTS:
        ok = False
        try:
            with torch.cuda.device(kw.device):
                w = torch.zeros(8, 16 * INNER_K_TILES // 2, dtype=torch.uint8, device=kw.device)
                packed = torch.ops.aten._convert_weight_to_int4pack(w, INNER_K_TILES)
                sz = torch.ones(1, 8, 2, dtype=dtype, device=kw.device)
                x = torch.ones(1, 16 * INNER_K_TILES, dtype=dtype, device=kw.device)
                y = torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
                ok = y.dtype == dtype and bool(torch.isfinite(y).all())
        except Exception as exc:  # RuntimeError from TORCH_CHECK, NotImplementedError, ...
            REFUSALS[key] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            logger.info("torch tinygemm does not take %s activations here: %s", dtype,
                        REFUSALS[key])
        _ACCEPTS[key] = ok
    return _ACCEPTS[key]
