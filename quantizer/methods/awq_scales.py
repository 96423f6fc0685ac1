"""AWQ's scale arithmetic: the candidate scales of the α grid, the grid search with its
non-finite guards, writing one candidate's fake-quantized weights, and folding the chosen
scales into the previous op (exactly, in float32, then rounded to the stored dtype)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch.folds import fold_into, folded_weight
from . import awq_memory
from .awq_clip import fake_quantize_float
from .rtn import check_group_size


def write_candidate(dest: torch.Tensor, w0: torch.Tensor, scales: torch.Tensor | None,
                    st, store_dtype: torch.dtype) -> None:
    """dest <- Q(W0·s)/s (or Q(W0) for s None), by row slices, in dest's dtype. W0·s is
    rounded to the layer's dtype first: that is exactly the tensor that will be quantized."""
    # row slices of awq_memory.CANDIDATE_SLICE_ELEMENTS: the float32 temporaries of the
    # fake-quantizer stay at a few x 16 MiB whatever the linear's size (the planner counts them)
    rows = max(1, awq_memory.CANDIDATE_SLICE_ELEMENTS // w0.shape[1])
    s = None if scales is None else scales.to(w0.device, torch.float32)
    for r0 in range(0, w0.shape[0], rows):
        w = w0[r0:r0 + rows]
        if s is None:
            q = fake_quantize_float(w, st.bits, st.group_size, st.symmetric)
        else:
            ws = (w.float() * s).to(store_dtype)
            q = fake_quantize_float(ws, st.bits, st.group_size, st.symmetric).div_(s)
        dest[r0:r0 + rows].copy_(q)


def weight_group_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Duo scaling's weight statistic: per input channel, the mean over all output rows of
    the linears of |W| normalised by its quantization group's max |W| (float32). Summed
    by row slices so no float32 copy of a whole (stacked) weight is ever made."""
    total: torch.Tensor | None = None
    n_rows = 0
    for w in weights:
        out_f, in_f = w.shape
        gs = check_group_size(in_f, group_size)
        step = max(1, awq_memory.CANDIDATE_SLICE_ELEMENTS // in_f)
        for r0 in range(0, out_f, step):
            wg = w[r0:r0 + step].float().abs().reshape(-1, in_f // gs, gs)
            wg = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
            part = wg.reshape(-1, in_f).sum(dim=0)
            total = part if total is None else total + part
        n_rows += out_f
    if total is None:
        raise ValueError("weight_group_mean needs at least one weight")
    return total / n_rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None,
                     alpha: float) -> torch.Tensor:
    """s for one grid point, normalised so that max(s)·min(s) = 1 (reference formula)."""
    if w_mean is not None:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def grid_search(losses_of: Callable[[torch.Tensor], float], x_mean: torch.Tensor,
                w_mean: torch.Tensor | None, grid: int) -> dict[str, Any]:
    """Try α = i/grid for i < grid; keep the first smallest finite loss. Non-finite losses
    are skipped; if none is finite the result has alpha None and scales of ones."""
    history = []
    best: dict[str, Any] = {"alpha": None, "loss": math.inf, "scales": torch.ones_like(x_mean)}
    for i in range(grid):
        alpha = i / grid
        s = candidate_scales(x_mean, w_mean, alpha)
        loss = losses_of(s)
        history.append(loss)
        if math.isfinite(loss) and loss < best["loss"]:
            best = {"alpha": alpha, "loss": loss, "scales": s}
    best["history"] = history
    return best


@torch.no_grad()
def fold_scales(layer: nn.Module, prev_name: str, linear_names: Sequence[str],
                scales: torch.Tensor, kind: str | None = "scale") -> None:
    """Exact in real arithmetic: prev's output channels / s, linears' input columns · s.
    `prev` is a norm (1-D weight, optional bias; `kind` "offset" for Gemma's x·(1+w)) or a
    linear (rows of weight and bias)."""
    prev = layer.get_submodule(prev_name)
    s = scales.float()
    fold_into(prev, kind, s)
    for name in linear_names:
        weight = layer.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        weight.data = (weight.data.float() * s).to(weight.dtype)


# Folded values must stay storable in float16: exports keep norms and biases in fp16.
_FOLD_LIMIT = torch.finfo(torch.float16).max


def fold_overflows(layer: nn.Module, prev_name: str, scales: torch.Tensor,
                   kind: str | None = "scale") -> bool:
    """True when prev / s would not fit float16 or prev's dtype (a tiny s on a norm): the
    candidate search never runs prev, so this is checked separately."""
    prev = layer.get_submodule(prev_name)
    # folded_weight: the weight's values, then the bias's when prev has one
    for t, like in zip(folded_weight(prev, kind, scales),
                       [prev.weight, getattr(prev, "bias", None)]):
        assert isinstance(like, torch.Tensor)
        folded = t.to(like.dtype)
        if not bool(torch.isfinite(folded).all()) or float(folded.abs().max()) > _FOLD_LIMIT:
            return True
    return False


def fold_shape_problem(layer: nn.Module, prev_name: str, linear_names: Sequence[str]):
    """Why scales cannot be folded across this group, or None when they can."""
    prev = layer.get_submodule(prev_name)
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{prev_name} has no weight to fold scales into"
    width = weight.shape[0]
    ins = set()
    for n in linear_names:
        w = layer.get_submodule(n).weight
        assert isinstance(w, torch.Tensor)
        ins.add(w.shape[1])
    if len(ins) != 1:
        return f"linears {list(linear_names)} have different input widths {sorted(ins)}"
    if width != ins.pop():
        return f"{prev_name} output width {width} != input width of {linear_names[0]}"
    return None
