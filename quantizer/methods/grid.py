"""Scale and zero point per quantization group: min-max (the baseline), or the shrink grid that
minimises the group's importance-weighted rounding error.

Min-max covers a group's whole range, so one outlier weight stretches the step of all the
others. The grid tries the range shrunk by 1, 1 - 1/n, ... (both ends by the same factor, as
llm-compressor's MSE and imatrix observers do), quantizes the group with each candidate
(weights beyond the shrunk range are clamped to the end codes) and keeps, per (row, group),
the candidate with the least  Σ_j imp_j · |w_j − ŵ_j|^norm.  `imp` is the importance of each
input column: E[x_j²] of the calibration inputs (llama.cpp's imatrix; GPTQ's Hessian diagonal
is 2·E[x²]), so columns whose inputs are large are rounded most carefully; with imp = 1 it is
the plain weight MSE, which needs no calibration.

Ties keep the larger range, so a group whose min-max parameters are already best keeps them
bit for bit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..settings import SCALE_SEARCHES  # noqa: F401 (re-exported)

# Rows per slice of the search: bounds its float32 temporaries (a few copies of a slice).
_SEARCH_SLICE_ELEMENTS = 1 << 22



@dataclass(frozen=True)
class GridSpec:
    """How group parameters are chosen. kind: minmax | mse (weight error, imp = 1) | imatrix
    (error weighted by the input's second moments). Candidates: the range times
    1 - i/steps for i = 0 .. max_shrink·steps."""

    kind: str = "minmax"
    steps: int = 20
    max_shrink: float = 0.5
    norm: float = 2.0
    refit: bool = True  # after the grid: least-squares scale (and zero) for the codes chosen

    @property
    def searches(self) -> bool:
        return self.kind != "minmax"

    @property
    def needs_importance(self) -> bool:
        return self.kind == "imatrix"

    def ratios(self) -> list[float]:
        n = max(0, int(round(self.max_shrink * self.steps)))
        return [1.0 - i / self.steps for i in range(n + 1)]


def range_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool,
                 min_zero: int = 0):
    """Scale and zero for the range [wmin, wmax] (float32, any shape), the range first widened
    to include 0 (so every code is reachable without clamping the zero point). min_zero = 1:
    never an asymmetric zero of 0 (GPTQ's checkpoint format stores zero-1): such a group gets
    zero 1 and a scale wide enough that its maximum still fits in codes 1..maxq."""
    maxq = (1 << bits) - 1
    wmin = wmin.clamp(max=0)
    wmax = wmax.clamp(min=0)
    if symmetric:
        wmax = torch.maximum(-wmin, wmax)
        scale = (2 * wmax / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    scale = ((wmax - wmin) / maxq).clamp(min=1e-8)
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    if min_zero:
        bad = zero < min_zero  # branch-free: no host sync inside GPTQ's column loop
        scale = torch.where(bad, torch.maximum(scale, wmax / (maxq - 1)), scale)
        zero = torch.where(bad, torch.ones_like(zero), zero)
    return scale, zero


def _fake(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (torch.clamp(torch.round(wg / s) + z, 0, maxq) - z) * s


@torch.no_grad()
def search_params(wg: torch.Tensor, bits: int, symmetric: bool, spec: GridSpec,
                  importance: torch.Tensor | None = None, min_zero: int = 0):
    """(scale, zero) per (..., group) for float32 groups `wg` (..., G, gs) whose last dim is
    one quantization group. importance: (G, gs) or broadcastable, >= 0; used by imatrix
    only (mse weighs every weight alike)."""
    wg = wg.float()
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    scale, zero = range_params(wmin, wmax, bits, symmetric, min_zero)
    if not spec.searches:
        return scale, zero
    maxq = (1 << bits) - 1
    imp = (importance.to(wg.device, torch.float32)
           if importance is not None and spec.needs_importance else None)
    flat = wg.reshape(-1, *wg.shape[-2:])  # (rows, G, gs)
    s_out, z_out = scale.reshape(-1, wg.shape[-2]), zero.reshape(-1, wg.shape[-2])
    mins, maxs = wmin.reshape(s_out.shape), wmax.reshape(s_out.shape)
    step = max(1, _SEARCH_SLICE_ELEMENTS // max(1, flat.shape[1] * flat.shape[2]))
    for r0 in range(0, flat.shape[0], step):
        w = flat[r0:r0 + step]
        best_s, best_z = s_out[r0:r0 + step], z_out[r0:r0 + step]
        best_err = None
        for p in spec.ratios():
            s, z = range_params(mins[r0:r0 + step] * p, maxs[r0:r0 + step] * p, bits,
                                symmetric, min_zero)
            d = (_fake(w, s, z, maxq) - w).abs_()
            d = d.square_() if spec.norm == 2.0 else d.pow_(spec.norm)
            if imp is not None:
                d.mul_(imp)
            err = d.sum(dim=-1)
            if best_err is None:
                best_err, best_s, best_z = err, s, z
                continue
            better = err < best_err  # strict: ties keep the wider range
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        if spec.refit:
            best_s, best_z = _refit(w, best_s, best_z, best_err, imp, maxq, symmetric, spec,
                                    bits, min_zero)
        s_out[r0:r0 + step] = best_s
        z_out[r0:r0 + step] = best_z
    return s_out.reshape(scale.shape), z_out.reshape(zero.shape)


def _refit(w, s, z, err, imp, maxq: int, symmetric: bool, spec: GridSpec, bits: int,
           min_zero: int):
    """Given the codes of (s, z), the (importance-)weighted least-squares scale -- and, when
    asymmetric, offset, rounded to an integer zero point -- kept where it lowers the error."""
    q = torch.clamp(torch.round(w / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, maxq)
    a = torch.ones_like(w) if imp is None else imp.expand_as(w)
    if symmetric:
        c = q - z.unsqueeze(-1)
        s2 = (a * c * w).sum(-1) / (a * c * c).sum(-1).clamp_min(1e-30)
        z2 = z
    else:
        # w ≈ s·q + m: the 2x2 normal equations per group
        sa, sq, sqq = a.sum(-1), (a * q).sum(-1), (a * q * q).sum(-1)
        sw, sqw = (a * w).sum(-1), (a * q * w).sum(-1)
        det = (sa * sqq - sq * sq)
        s2 = (sa * sqw - sq * sw) / det.where(det.abs() > 1e-30, torch.ones_like(det))
        m = (sqq * sw - sq * sqw) / det.where(det.abs() > 1e-30, torch.ones_like(det))
        ok = (det.abs() > 1e-30) & (s2 > 1e-8)
        s2 = torch.where(ok, s2, s)
        z2 = torch.where(ok, torch.round(-m / s2).clamp(min_zero, maxq), z)
        c = q - z2.unsqueeze(-1)  # the scale again for the integer zero point
        s2 = torch.where(ok, (a * c * w).sum(-1) / (a * c * c).sum(-1).clamp_min(1e-30), s)
    s2 = s2.clamp(min=1e-8)
    d = (_fake(w, s2, z2, maxq) - w).abs_()
    d = d.square_() if spec.norm == 2.0 else d.pow_(spec.norm)
    if imp is not None:
        d.mul_(imp)
    better = d.sum(dim=-1) < err
    return torch.where(better, s2, s), torch.where(better, z2, z)


def grid_spec(kind: str = "minmax", **kw) -> GridSpec:
    if kind not in SCALE_SEARCHES:
        raise InputError(f"scale search must be one of {', '.join(SCALE_SEARCHES)}, "
                         f"got {kind!r}")
    return GridSpec(kind, **kw)


__all__ = ["GridSpec", "SCALE_SEARCHES", "grid_spec", "range_params", "search_params"]
