"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and push each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian of
the layer's input, H = 2 XᵀX. Shared-input linears (q/k/v, gate/up) share one H; groups run
true-sequentially so each group's Hessian sees the quantized predecessors' outputs."""
from __future__ import annotations

import math
import time

import torch

from quantizer.errors import InputError
from quantizer.kernels.packing import SUPPORTED_BITS, QuantizedWeight

from . import register_method
from .rtn import check_group_size, group_params


class HessianAccumulator:
    """Running mean of 2 x xᵀ over calibration tokens, in float32 whatever the input dtype.

    The running-mean scaling keeps H's magnitude independent of the number of tokens (as
    the reference implementation does) so float32 never overflows on long calibration sets."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros((n_features, n_features), dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        # H <- H * n/(n+m) + (2/(n+m)) * xᵀx, in one fused addmm.
        self.H.addmm_(x.t(), x, beta=self.n_tokens / total, alpha=2.0 / total)
        self.n_tokens = total


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ‖(W-Ŵ)X‖/‖WX‖ from H ∝ XᵀX: tr(D H Dᵀ)/tr(W H Wᵀ), no forward."""
    w = w.to(H.device, torch.float32)
    d = w - w_hat.to(H.device, torch.float32)
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum()
    return math.sqrt(max(float(num), 0.0) / float(den)) if float(den) > 0 else 0.0


def _params(w: torch.Tensor, bits: int, symmetric: bool):
    """Per-row scale/zero of `w` (rows, cols) via RTN's group_params, but never an asymmetric
    zero point of 0: checkpoint_format "gptq" stores zero-1, so 0 is unrepresentable there.
    A row that would get zero 0 (no negative weight beyond scale/2) gets zero 1 and a scale
    wide enough that its maximum still fits in codes 1..maxq."""
    scale, zero = group_params(w, bits, symmetric)
    if not symmetric:
        maxq = (1 << bits) - 1
        bad = zero < 1
        if bool(bad.any()):
            wmax = w.float().amax(dim=-1).clamp(min=0)
            scale = torch.where(bad, torch.maximum(scale, wmax / (maxq - 1)), scale)
            zero = torch.where(bad, torch.ones_like(zero), zero)
    return scale, zero


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, log, max_retries: int = 4):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹; on failure retry with λ×10."""
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    idx = torch.arange(n, device=H.device)
    lam = damp
    for attempt in range(max_retries + 1):
        Hd = H.clone()
        Hd[idx, idx] += lam * mean_diag
        try:
            L = torch.linalg.cholesky(Hd)
            U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if bool(torch.isfinite(U).all()):
                return U, lam, attempt
            reason = "non-finite factor"
        except (RuntimeError, torch.linalg.LinAlgError) as e:  # not positive definite
            reason = str(e).splitlines()[0][:120]
        if attempt < max_retries:
            log(f"gptq: Cholesky failed at damp={lam:g} ({reason}); retrying at damp={lam * 10:g}")
            lam *= 10
    raise InputError(f"GPTQ: the Hessian is not positive definite even at damp={lam:g} "
                     f"(calibration inputs may contain NaN/inf)")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                  damp: float = 0.01, block: int = 128, log=print, name: str = "weight"
                  ) -> tuple[QuantizedWeight, dict]:
    """Quantize W (out, in) against Hessian H (in, in). Returns the canonical QuantizedWeight
    (codes in original column order; g_idx only for act-order without static groups) and
    info {damp_used, retries, dead_columns}. Neither W nor H is modified."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in {SUPPORTED_BITS}, got {bits}")
    out_f, n = W.shape
    gs = check_group_size(n, group_size, name)
    maxq = (1 << bits) - 1
    W = W.to(H.device, torch.float32).clone()
    H = H.to(torch.float32).clone()
    # A column that never saw a non-zero input contributes nothing: quantize it to 0 and keep
    # H invertible.
    dead = torch.diagonal(H) == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1
        W[:, dead] = 0
    n_groups = n // gs
    if group_size == -1 or static_groups:
        # Parameters up front from the unpermuted weight, so group g covers columns
        # g*gs..(g+1)*gs-1 whatever order the columns are quantized in.
        static = [_params(W[:, g * gs:(g + 1) * gs], bits, symmetric) for g in range(n_groups)]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    U, damp_used, retries = _inverse_hessian_cholesky(H, damp, log)
    del H

    # Align the block with groups so every group's parameters are computed from weights
    # that already carry all earlier columns' error feedback.
    block = (block // gs) * gs if gs <= block else math.gcd(block, gs)
    codes = torch.zeros((out_f, n), dtype=torch.uint8, device=W.device)
    scales = torch.zeros((out_f, n_groups), dtype=torch.float32, device=W.device)
    zeros = torch.zeros((out_f, n_groups), dtype=torch.float32, device=W.device)
    orig_col = perm if perm is not None else torch.arange(n, device=W.device)
    orig_list = orig_col.tolist()
    scale = zero = None
    cur_group = -1
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size == -1 or static_groups:
                g = orig_list[col] // gs
                if scale is None or g != cur_group:
                    scale, zero = static[g]
                    cur_group = g
            elif col % gs == 0:
                span = W1[:, i:i + gs] if i + gs <= i2 - i1 else torch.cat(
                    [W1[:, i:], W[:, i2:col + gs]], dim=1)
                scale, zero = _params(span, bits, symmetric)
                g = col // gs
                scales[:, g], zeros[:, g] = scale, zero
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zero) * scale) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        if i2 < n:
            W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])

    g_idx = None
    if group_size == -1 or static_groups:
        for g, (s, z) in enumerate(static):
            scales[:, g], zeros[:, g] = s, z
    elif act_order:
        # Group k holds permuted columns k*gs..; map back to each original column.
        g_idx = torch.empty(n, dtype=torch.int32, device=W.device)
        g_idx[orig_col] = (torch.arange(n, device=W.device) // gs).to(torch.int32)
    if perm is not None:
        unpermuted = torch.empty_like(codes)
        unpermuted[:, perm] = codes
        codes = unpermuted
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros.to(torch.int32), bits=bits,
                         group_size=group_size, g_idx=g_idx, symmetric=symmetric)
    return qw, {"damp_used": damp_used, "retries": retries, "dead_columns": n_dead}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def group_hessian(ctx, group: tuple[str, ...]) -> HessianAccumulator:
    """One Hessian from the shared input of `group` over every calibration chunk (capturing
    only the first member stops the forward as early as possible)."""
    first = group[0]
    acc = HessianAccumulator(ctx.module(first).in_features, ctx.device)
    for seen in ctx.capture((first,)):
        acc.add(seen[first])
    return acc


class GPTQ:
    """Method: true-sequential GPTQ over the layer's input groups."""

    name = "gptq"
    needs_calibration = True

    def __init__(self, damp: float = 0.01, act_order: bool = False,
                 static_groups: bool = False, block: int = 128, **unknown):
        if unknown:
            raise InputError(f"unknown GPTQ option(s) {sorted(unknown)}; known: damp, "
                             f"act_order, static_groups, block")
        if not 0 < float(damp) < 1:
            raise InputError(f"--damp must be in (0, 1), got {damp}")
        self.damp = float(damp)
        self.act_order = bool(act_order)
        self.static_groups = bool(static_groups)
        self.block = int(block)

    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        s = ctx.settings
        out: dict[str, QuantizedWeight] = {}
        per_module = ctx.stats.setdefault("modules", {})
        totals = {"hessian_s": 0.0, "solve_s": 0.0, "damp_retries": 0}
        for group in ctx.arch.input_groups:
            t0 = time.perf_counter()
            acc = group_hessian(ctx, group)
            _sync(ctx.device)
            t_hess = time.perf_counter() - t0
            totals["hessian_s"] += t_hess
            for name in group:
                lin = ctx.module(name)
                t1 = time.perf_counter()
                q, info = gptq_quantize(lin.weight.data, acc.H, int(s.bits), s.group_size,
                                        s.symmetric, self.act_order, self.static_groups,
                                        self.damp, self.block, log=ctx.log,
                                        name=ctx.full_name(name))
                _sync(ctx.device)
                t_solve = time.perf_counter() - t1
                rel = output_error(lin.weight.data, q.dequantize(torch.float32), acc.H)
                if info["retries"]:
                    ctx.log(f"gptq: {ctx.full_name(name)} needed damp={info['damp_used']:g} "
                            f"({info['retries']} retr{'y' if info['retries'] == 1 else 'ies'})")
                per_module[name] = {"hessian_s": t_hess, "solve_s": t_solve,
                                    "damp_used": info["damp_used"], "retries": info["retries"],
                                    "dead_columns": info["dead_columns"], "rel_error": rel,
                                    "tokens": acc.n_tokens}
                totals["solve_s"] += t_solve
                totals["damp_retries"] += info["retries"]
                out[name] = q
            # Later groups must see this group's quantized outputs (true-sequential).
            for name in group:
                ctx.set_quantized(name, out[name])
            del acc
        for k, v in totals.items():
            ctx.stats[k] = ctx.stats.get(k, 0) + v
        return out


register_method("gptq", GPTQ)
