"""Round-to-nearest: per-group min/max quantization, the baseline every method builds on."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..kernels.packing import SUPPORTED_BITS, QuantizedWeight
from ..settings import rounding_with
from .grid import GridSpec, grid_spec, range_params, search_params
from .importance import second_moments
from .token_weights import token_weights_for


def group_params(w: torch.Tensor, bits: int, symmetric: bool = False):
    """Scale and zero point per row of `w` (rows = groups), in float32.

    The range always includes 0 (as GPTQ does), so every code is reachable without clamping
    the zero point and the round-trip error stays within scale/2."""
    w = w.float()
    return range_params(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Codes for `w` given per-element-broadcastable scale/zero (float math, exact rounding)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1)


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise InputError(f"group size {group_size} does not divide in_features={in_features} "
                         f"of {name}; choose a divisor, -1 (per channel) or --group-size auto")
    return group_size


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 clip_ratio: float | torch.Tensor = 1.0, name: str = "weight",
                 grid: GridSpec | None = None,
                 importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a (out, in) weight. `clip_ratio` shrinks each group's range (AWQ's clip search
    passes a per-(row, group) tensor). `grid` chooses each group's scale and zero by its
    search (methods/grid.py) with `importance` (in,) per input column; None: min-max."""
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
    if grid is not None and grid.searches:
        imp = None if importance is None else importance.reshape(in_f // gs, gs)
        scale, zero = search_params(wg, bits, symmetric, grid, imp)
    else:
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
    """Method: each linear rounded independently. scale_search (methods/grid.py): minmax (no
    calibration), mse (the weight error's shrink grid, no calibration) or imatrix (the grid
    weighted by the calibration inputs' E[x²]: RTN then calibrates, one capture forward per
    layer); token_weights: how imatrix weighs tokens (methods/token_weights.py)."""

    name = "rtn"

    def __init__(self, options=None, rounding=None, **overrides):
        """RTN has no options of its own; `rounding` (settings.RoundingOptions) with keyword
        overrides (scale_search="imatrix")."""
        if options is not None:
            raise InputError(f"--method rtn takes no method options, got {options}")
        r = rounding_with(rounding, overrides, "rtn")
        if overrides:
            raise InputError(f"unknown option(s) {sorted(overrides)} for --method rtn "
                             f"(it takes: scale_search, token_weights)")
        self.grid = grid_spec(r.search)
        self.token_weights = r.weights

    @property
    def needs_calibration(self) -> bool:
        return self.grid.needs_importance

    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        s = ctx.settings
        importance = self._importance(ctx) if self.grid.needs_importance else {}
        out = {}
        for group in ctx.arch.input_groups:
            for name in group:
                lin = ctx.module(name)
                out[name] = rtn_quantize(lin.weight.data, s.bits, s.group_size, s.symmetric,
                                         name=ctx.full_name(name), grid=self.grid,
                                         importance=importance.get(group[0]))
        return {name: out[name] for name in ctx.arch.linears}

    def _importance(self, ctx) -> dict[str, torch.Tensor]:
        if not ctx.inputs:
            raise InputError("rtn with --scale-search imatrix needs calibration inputs "
                             "(--calib-samples > 0)")
        tw = token_weights_for(ctx, self.token_weights)
        return second_moments(ctx, [g[0] for g in ctx.arch.input_groups], tw)
