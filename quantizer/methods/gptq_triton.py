"""GPTQ's column recursion as one Triton kernel per block segment.

Driven from Python, GPTQ spends ~7 tiny kernel launches per column (tens of microseconds of
host time each on a GPU that finishes them in one), which dominates a 7B layer's solve.
Rows of W are independent given H, so each program here owns a tile of BLOCK_O output rows
for the whole block (≤128 columns) in registers and runs the block's columns sequentially:
extract column i, quantize it with its group's scale/zero, store codes and the scaled error,
and apply the rank-1 update to the tile's later columns. Group parameters of dynamic groups
are computed between launches by the same `params` callable the Python path uses
(gptq_columns.gptq_group_params; a segment ends where a group starts), so both paths share one
definition of a group's scale and zero.

Rounding is round-half-to-even, written out with floor so it does not depend on a libdevice
function (torch.round is half-to-even too)."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return triton is not None and os.environ.get("LAYERQUANT_GPTQ_TRITON", "1") != "0"


if triton is not None:
    @triton.jit
    def _gptq_segment_kernel(W, Q, E, U, S, Z, GID, stride_w, stride_u, out_f, seg_start,
                             seg_end, count, maxq, COUNT: tl.constexpr, BLOCK_O: tl.constexpr):
        pid = tl.program_id(0)
        o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = o < out_f
        r = tl.arange(0, COUNT)
        live = (r >= seg_start) & (r < count)
        tile = tl.load(W + r[:, None] * stride_w + o[None, :],
                       mask=live[:, None] & omask[None, :], other=0.0)
        for i in range(seg_start, seg_end):
            w = tl.sum(tl.where((r == i)[:, None], tile, 0.0), axis=0)
            g = tl.load(GID + i)
            s = tl.load(S + g * out_f + o, mask=omask, other=1.0)
            z = tl.load(Z + g * out_f + o, mask=omask, other=0.0)
            x = tl.div_rn(w, s)  # IEEE division, as torch: codes match the Python path
            f = tl.floor(x)
            frac = x - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
            q = tl.minimum(tl.maximum(f + tl.where(up, 1.0, 0.0) + z, 0.0), maxq)
            err = (w - (q - z) * s) / tl.load(U + i * stride_u + i)
            tl.store(Q + i * stride_w + o, q, mask=omask)
            tl.store(E + i * stride_w + o, err, mask=omask)
            u = tl.load(U + i * stride_u + r, mask=(r > i) & (r < count), other=0.0)
            tile = tile - u[:, None] * err[None, :]
        keep = (r >= seg_end) & (r < count)
        tl.store(W + r[:, None] * stride_w + o[None, :], tile,
                 mask=keep[:, None] & omask[None, :])


BLOCK_O = 32


def solve_columns_triton(WT, U, QT, scales, zeros, gid, dynamic, gs, block, bits, params):
    """Same contract as gptq_columns.solve_columns_torch (in place on WT, QT, scales, zeros)."""
    if triton is None:
        raise RuntimeError("the triton GPTQ backend needs triton installed")
    if not (WT.is_cuda or interpreting()):
        raise RuntimeError("the triton GPTQ backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    if WT.is_cuda:  # Triton launches on the current device: make it WT's
        with torch.cuda.device(WT.device):
            return _solve(WT, U, QT, scales, zeros, gid, dynamic, gs, block, bits, params)
    return _solve(WT, U, QT, scales, zeros, gid, dynamic, gs, block, bits, params)


def _solve(WT, U, QT, scales, zeros, gid, dynamic, gs, block, bits, params):
    n, out_f = WT.shape
    assert WT.is_contiguous() and QT.is_contiguous() and scales.is_contiguous()
    assert U.stride(1) == 1
    COUNT = triton.next_power_of_2(block)
    grid = (triton.cdiv(out_f, BLOCK_O),)
    gids: list[int] = gid.tolist() if dynamic else []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        count = i2 - i1
        W1, Q1, U1 = WT[i1:i2], QT[i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        # segments end where a dynamic group starts (its parameters need the updated weights)
        starts = [0]
        if dynamic:
            starts = [i for i in range(count) if i == 0 or gids[i1 + i] != gids[i1 + i - 1]]
        for k, s0 in enumerate(starts):
            s1 = starts[k + 1] if k + 1 < len(starts) else count
            if dynamic:
                g, col = gids[i1 + s0], i1 + s0
                span = W1[s0:s0 + gs] if s0 + gs <= count else torch.cat([W1[s0:],
                                                                         WT[i2:col + gs]])
                scales[g], zeros[g] = params(span.t(), col)
            _gptq_segment_kernel[grid](W1, Q1, Err1, U1, scales, zeros, gid[i1:i2], out_f,
                                       U.stride(0), out_f, s0, s1, count, float((1 << bits) - 1),
                                       COUNT=COUNT, BLOCK_O=BLOCK_O, num_warps=4)
        if i2 < n:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
