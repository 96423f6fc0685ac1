"""GPTQ's column recursion: each column quantized with its group's scale and zero, its error
pushed onto the later columns through the inverse Hessian's factor, lazily per block. Two
implementations of the same arithmetic: a Python loop over columns (torch) and a Triton
kernel per block segment (gptq_triton.py), chosen per process by `ColumnSolver`."""
from __future__ import annotations

import logging

import torch

from . import gptq_triton
from .grid import GridSpec, range_params, search_params

log = logging.getLogger(__name__)


def gptq_group_params(w: torch.Tensor, bits: int, symmetric: bool, grid: GridSpec | None = None,
                      importance: torch.Tensor | None = None):
    """Per-row scale/zero of `w` (rows, cols) -- min-max, or the grid's search weighted by
    `importance` (cols,) -- but never an asymmetric zero point of 0: checkpoint_format "gptq"
    stores zero-1, so 0 is unrepresentable there. A row that would get zero 0 (no negative
    weight beyond scale/2) gets zero 1 and a scale wide enough that its maximum still fits in
    codes 1..maxq."""
    if grid is None or not grid.searches:
        w = w.float()
        return range_params(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric, min_zero=1)
    imp = None if importance is None else importance.reshape(1, -1)
    scale, zero = search_params(w.unsqueeze(-2), bits, symmetric, grid, imp, min_zero=1)
    return scale.squeeze(-1), zero.squeeze(-1)


def solve_columns_torch(WT, U, QT, scales, zeros, gid, dynamic, gs, block, bits, params):
    """The GPTQ recursion, one column per step, lazy batch updates per block (in place).

    WT (n, out): the weight's columns as rows, in visiting order; U (n, n): upper Cholesky
    factor of H⁻¹ in the same order; QT receives the codes (as floats). scales/zeros
    (n_groups, out) are read (static groups) or written at each group's first column by
    params(columns (out, gs), first visited column) -> (scale, zero)."""
    n = WT.shape[0]
    maxq = (1 << bits) - 1
    gids = gid.tolist()
    cur = -1
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        inv_d = (1 / torch.diagonal(U1)).tolist()  # one host sync per block
        for i in range(i2 - i1):
            col, g = i1 + i, gids[i1 + i]
            if g != cur:
                if dynamic:  # a group starts here: parameters from the updated weights
                    span = W1[i:i + gs] if i + gs <= i2 - i1 else torch.cat(
                        [W1[i:], WT[i2:col + gs]])
                    scales[g], zeros[g] = params(span.t(), col)
                scale, zero = scales[g], zeros[g]
                zs = zero * scale
                cur = g
            w, q, e = W1[i], QT[col], Err1[i]
            # codes = clamp(round(w/s) + z), bit-identical to RTN (divide, then add z: the
            # symmetric range's end points sit exactly on rounding ties)
            torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, maxq)
            torch.addcmul(w, q, scale, value=-1, out=e)  # e = (w - (q - z)·s) / U_ii
            e.add_(zs).mul_(inv_d[i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1)
        if i2 < n:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)


class ColumnSolver:
    """Which implementation solves the columns in this process: "auto" takes the Triton
    kernel on CUDA until it fails to build or run once (then the Python loop, for the rest of
    the process: a kernel that fails must not fail the run); "torch" / "triton" force one."""

    def __init__(self):
        self.proven = False  # the kernel has built and run once here
        self.broken = False  # ... or it failed: the Python loop from now on

    def usable(self) -> bool:
        return not self.broken and gptq_triton.available()

    def solve(self, WT: torch.Tensor, args: tuple, backend: str = "auto") -> torch.Tensor:
        """Solve in place (WT and args as solve_columns_torch takes them); returns the
        tensor holding the result (a copy when the kernel failed and the loop redid it)."""
        if backend == "triton":
            gptq_triton.solve_columns_triton(WT, *args)
            return WT
        if not (backend == "auto" and WT.is_cuda and self.usable()):
            solve_columns_torch(WT, *args)
            return WT
        # A copy to fall back on only until the kernel has built and run once in this
        # process: after that the copy would be an fp32 weight of GPU memory for nothing.
        backup = None if self.proven else WT.clone()
        try:
            gptq_triton.solve_columns_triton(WT, *args)
            self.proven = True
            return WT
        except Exception as e:  # a kernel that fails to build must not fail the run
            if backup is None or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            self.broken = True
            log.warning("gptq: Triton solver failed (%s: %s); using the Python column loop "
                        "from now on", type(e).__name__, str(e)[:200])
            solve_columns_torch(backup, *args)
            return backup


SOLVER = ColumnSolver()  # one per process: whether this GPU's kernel builds is a process fact
