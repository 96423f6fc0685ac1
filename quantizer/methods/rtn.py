"""Round-to-nearest: per-group min/max quantization, the baseline every method builds on."""
from __future__ import annotations

import torch

from quantizer.kernels.packing import SUPPORTED_BITS, QuantizedWeight


def group_params(w: torch.Tensor, bits: int, symmetric: bool = False):
    """Scale and zero point per row of `w` (rows = groups), in float32.

    The range always includes 0 (as GPTQ does), so every code is reachable without clamping
    the zero point and the round-trip error stays within scale/2."""
    maxq = (1 << bits) - 1
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0)
    wmax = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        wmax = torch.maximum(-wmin, wmax)
        scale = (2 * wmax / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((wmax - wmin) / maxq).clamp(min=1e-8)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Codes for `w` given per-element-broadcastable scale/zero (float math, exact rounding)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1)


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        from quantizer.errors import InputError
        raise InputError(f"group size {group_size} does not divide in_features={in_features} "
                         f"of {name}; choose a divisor, -1 (per channel) or --group-size auto")
    return group_size


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 clip_ratio: float | torch.Tensor = 1.0, name: str = "weight") -> QuantizedWeight:
    """Quantize a (out, in) weight. `clip_ratio` shrinks each group's range (AWQ's clip search
    passes a per-(row, group) tensor)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in {SUPPORTED_BITS}, got {bits}")
    out_f, in_f = w.shape
    gs = check_group_size(in_f, group_size, name)
    wg = w.float().reshape(out_f, in_f // gs, gs)
    if not isinstance(clip_ratio, float) or clip_ratio != 1.0:
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
        if ratio.dim() == 2:
            ratio = ratio.unsqueeze(-1)
        limit = wg.abs().amax(dim=-1, keepdim=True) * ratio
        wg = torch.maximum(torch.minimum(wg, limit), -limit)
    scale, zero = group_params(wg, bits, symmetric)
    codes = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return QuantizedWeight(codes=codes.reshape(out_f, in_f).to(torch.uint8), scales=scale,
                           zeros=zero.to(torch.int32), bits=bits, group_size=group_size,
                           symmetric=symmetric)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize-dequantize in float (the reference every packed path is checked against)."""
    q = rtn_quantize(w, bits, group_size, symmetric, clip_ratio)
    return q.dequantize(torch.float32).to(w.dtype)


class RTN:
    """Method: no calibration, each linear rounded independently."""

    name = "rtn"
    needs_calibration = False

    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        s = ctx.settings
        out = {}
        for name in ctx.arch.linears:
            lin = ctx.module(name)
            out[name] = rtn_quantize(lin.weight.data, s.bits, s.group_size, s.symmetric,
                                     name=ctx.full_name(name))
        return out
