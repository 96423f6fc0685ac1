"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and push each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian of
the layer's input, H = 2 XᵀX. Shared-input linears (q/k/v, gate/up) share one H; groups run
true-sequentially so each group's Hessian sees the quantized predecessors' outputs.
The column recursion itself is gptq_columns.py; H and its factor gptq_hessian.py; the memory
the planner counts for all of it gptq_memory.py."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..kernels.packing import SUPPORTED_BITS, QuantizedWeight
from ..parallel.shards import ShardFold, layout_of, run_units
from ..settings import GPTQOptions, options_with, rounding_with
from .gptq_columns import SOLVER, gptq_group_params
from .gptq_hessian import (HessianAccumulator, PreparedHessian, output_error, park,
                           prepare_hessian, report_errors)
from .grid import GridSpec, grid_spec
from .rtn import check_group_size
from .token_weights import token_weights_for, weights_for

log = logging.getLogger(__name__)

__all__ = ["GPTQ", "HessianAccumulator", "PreparedHessian", "gptq_group_params",
           "gptq_quantize", "group_hessians", "output_error", "prepare_hessian",
           "quantize_group", "split_rows"]


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, bits: int, group_size: int,
                  symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                  damp: float = GPTQOptions.damp, block: int = GPTQOptions.block,
                  name: str = "weight", prepared: PreparedHessian | None = None,
                  backend: str = "auto", grid: GridSpec | None = None
                  ) -> tuple[QuantizedWeight, dict]:
    """Quantize W (out, in) against Hessian H (in, in) (or a PreparedHessian made from it with
    the same act_order). Returns the canonical QuantizedWeight (codes in original column
    order; g_idx only for act-order without static groups) and info {damp_used, retries,
    dead_columns}. Neither W nor H is modified. backend: "torch" (one column at a time from
    Python), "triton" (gptq_triton's fused block kernel) or "auto" (triton on CUDA).
    grid: how each group's scale and zero are chosen (methods/grid.py; its importance is H's
    diagonal), before the solve for static groups, at the group's first column (from the
    updated weights) for dynamic ones; None: min-max."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in {SUPPORTED_BITS}, got {bits}")
    if prepared is None:
        if H is None:
            raise ValueError("gptq_quantize needs H or a prepared Hessian")
        prepared = prepare_hessian(H, act_order, damp)
    elif (prepared.perm is not None) != bool(act_order):
        raise ValueError("prepared Hessian was made with a different act_order")
    gs = check_group_size(W.shape[1], group_size, name)
    dynamic = not (group_size == -1 or static_groups)
    searching = grid is not None and grid.searches
    imp = prepared.diag if searching and grid is not None and grid.needs_importance else None
    WT, scales, zeros = _columns(W, prepared, bits, gs, symmetric, dynamic, grid, imp)
    QT = torch.empty_like(WT)
    n, perm = WT.shape[0], prepared.perm
    # Group of each visited column: its own position // gs, or its original column's group
    # when static groups are visited in act-order.
    gid = torch.arange(n, device=WT.device) if perm is None or dynamic else perm
    gid = (gid // gs).to(torch.int32)
    # Align blocks with groups so every group's parameters come from weights that already
    # carry all earlier columns' error feedback.
    block = (block // gs) * gs if gs <= block else math.gcd(block, gs)
    if imp is not None and perm is not None:
        imp = imp[perm]  # dynamic groups take the visited columns' importance

    def params(w: torch.Tensor, col: int):
        return gptq_group_params(w, bits, symmetric, grid,
                                 None if imp is None else imp[col:col + w.shape[1]])

    SOLVER.solve(WT, (prepared.U, QT, scales, zeros, gid, dynamic, gs, block, bits, params),
                 backend)
    qw = _quantized(QT, scales, zeros, perm, dynamic, gs, bits, group_size, symmetric)
    return qw, {"damp_used": prepared.damp_used, "retries": prepared.retries,
                "dead_columns": int(prepared.dead.sum())}


def _columns(W: torch.Tensor, prepared: PreparedHessian, bits: int, gs: int, symmetric: bool,
             dynamic: bool, grid: GridSpec | None = None, imp: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W's columns as rows in visiting order (one fp32 copy; dead columns zeroed), and the
    group scales / zeros, filled up front for static groups (by `grid`'s search weighted by
    `imp`, H's diagonal in original column order, when given)."""
    out_f, n = W.shape
    W = W.to(prepared.U.device, torch.float32, copy=True)  # the planner counts two copies
    W[:, prepared.dead] = 0
    n_groups = n // gs
    scales = torch.zeros((n_groups, out_f), dtype=torch.float32, device=W.device)
    zeros = torch.zeros((n_groups, out_f), dtype=torch.float32, device=W.device)
    if not dynamic:
        # Parameters up front from the unpermuted weight, so group g covers columns
        # g*gs..(g+1)*gs-1 whatever order the columns are quantized in.
        for g in range(n_groups):
            scales[g], zeros[g] = gptq_group_params(
                W[:, g * gs:(g + 1) * gs], bits, symmetric, grid,
                None if imp is None else imp[g * gs:(g + 1) * gs])
    perm = prepared.perm
    # Columns as rows: every column GPTQ visits is one contiguous vector.
    return (W[:, perm] if perm is not None else W).t().contiguous(), scales, zeros


def _quantized(QT: torch.Tensor, scales, zeros, perm, dynamic: bool, gs: int, bits: int,
               group_size: int, symmetric: bool) -> QuantizedWeight:
    """The solved codes in original column order, with g_idx for dynamic act-order groups."""
    n = QT.shape[0]
    g_idx = None
    if dynamic and perm is not None:
        # Group k holds permuted columns k*gs..; map back to each original column.
        g_idx = torch.empty(n, dtype=torch.int32, device=QT.device)
        g_idx[perm] = (torch.arange(n, device=QT.device) // gs).to(torch.int32)
    codes = QT.t().to(torch.uint8)
    if perm is not None:
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
    return QuantizedWeight(codes=codes.contiguous(), scales=scales.t().contiguous(),
                           zeros=zeros.t().to(torch.int32).contiguous(), bits=bits,
                           group_size=group_size, g_idx=g_idx, symmetric=symmetric)


def split_rows(q: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a weight quantized as stacked rows (linears sharing one input and one H, which
    GPTQ treats row by row) back into one QuantizedWeight per linear."""
    out, r = [], 0
    for size in sizes:
        out.append(QuantizedWeight(q.codes[r:r + size].contiguous(),
                                   q.scales[r:r + size].contiguous(),
                                   q.zeros[r:r + size].contiguous(), q.bits, q.group_size,
                                   None if q.g_idx is None else q.g_idx.clone(), q.symmetric))
        r += size
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def group_hessians(ctx, groups, device=None, host_total: bool = False,
                   token_weights: dict | None = None
                   ) -> dict[tuple[str, ...], HessianAccumulator]:
    """One Hessian per input group from its shared input over every calibration chunk, all
    groups in one pass per chunk (capturing only each group's first member; the forward stops
    after the last one). token_weights: methods/token_weights.py's, weighing each token."""
    firsts = [g[0] for g in groups]
    layout = layout_of(ctx)
    # per calibration shard, folded in shard order: the same sums on any number of processes
    device = ctx.device if device is None else device
    folds = {g: ShardFold(layout, lambda g=g: HessianAccumulator(
        ctx.module(g[0]).in_features, device), host_total) for g in groups}
    for k, seen in enumerate(ctx.capture(firsts)):  # to its end: that removes the hooks
        for g in groups:
            x = seen[g[0]]
            folds[g].part(layout.shard_of[k]).add(x, weights_for(token_weights, g[0], k, x))
    return {g: folds[g].result() for g in groups}


def _rows(weights: list[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of the weights stacked by rows, copying only those rows."""
    parts, start = [], 0
    for w in weights:
        a, b = max(r0 - start, 0), min(r1 - start, w.shape[0])
        if a < b:
            parts.append(w[a:b])
        start += w.shape[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return QuantizedWeight(torch.cat([p.codes for p in parts]),
                           torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), first.bits, first.group_size,
                           first.g_idx, first.symmetric)


def quantize_group(ctx, group, H, settings: dict[str, tuple[int, int]], symmetric: bool,
                   options: GPTQOptions, prepared: PreparedHessian | None = None,
                   row_slices: int = 1, parallel: bool = True, grid: GridSpec | None = None):
    """GPTQ every linear of one input group against the group's H. Linears with the same
    (bits, group_size) are stacked row-wise into one solve (GPTQ treats rows independently
    given H, so this is exact and visits each column once instead of once per linear), in
    `row_slices` slices of rows (the planner's choice: each slice's fp32 copies are that much
    smaller). `options`: resolved GPTQOptions. Returns ({name: QuantizedWeight}, info)."""
    if prepared is None:
        prepared = prepare_hessian(H, bool(options.act_order), options.damp)
    buckets: dict[tuple[int, int], list[str]] = {}
    for name in group:
        buckets.setdefault(settings[name], []).append(name)

    def solve(unit):
        (bits, gs), names = unit
        weights = [ctx.module(n).weight.data for n in names]
        total = sum(w.shape[0] for w in weights)
        step = -(-total // max(1, row_slices))
        parts = []
        for r0 in range(0, total, step):
            q, info = gptq_quantize(_rows(weights, r0, min(r0 + step, total)), None, bits, gs,
                                    symmetric, bool(options.act_order),
                                    bool(options.static_groups),
                                    options.damp, options.block,
                                    name=ctx.full_name(names[0]), prepared=prepared,
                                    grid=grid)
            parts.append(q)
        return split_rows(_cat_rows(parts), [w.shape[0] for w in weights]), info

    # Each stacked solve is one unit of work; with several processes they run on different
    # ranks at once and every rank receives every result (parallel/shards.py run_units).
    units = list(buckets.items())
    out: dict[str, QuantizedWeight] = {}
    info: dict = {}
    solved = (run_units(layout_of(ctx), units, solve) if parallel
              else [solve(u) for u in units])  # already inside another rank's unit
    for ((_, names), (qs, info)) in zip(units, solved):
        out.update(zip(names, qs))
    return out, info


@dataclass
class _LayerRecord:
    """What quantize_weighted gathers over a layer's groups."""

    per_module: dict  # ctx.stats["modules"]: linear -> its record
    out: dict[str, QuantizedWeight] = field(default_factory=dict)
    totals: dict = field(default_factory=lambda: {"hessian_s": 0.0, "solve_s": 0.0,
                                                  "damp_retries": 0})


def _hessian_placement(dec) -> tuple[str, int]:
    """(where the plan puts the layer's Hessians: gpu/park/cpu, row slices of the solve)."""
    layer_where = dec.hessian if dec is not None and dec.hessian != "none" else "gpu"
    return layer_where, dec.row_slices if dec is not None else 1


class GPTQ:
    """Method: true-sequential GPTQ over the layer's input groups.

    `module_settings` ({full module name: (bits, group_size)}, e.g. from the bpw optimiser's
    selection) overrides ctx.settings' bits and group size per linear. Where Hessians live
    and the row slices of the solve follow the plan's decisions (ctx.decisions)."""

    name = "gptq"
    needs_calibration = True

    def __init__(self, options: GPTQOptions | None = None, rounding=None,
                 module_settings: dict[str, tuple[int, int]] | None = None, **overrides):
        """`options` (default GPTQOptions()) and `rounding` (settings.RoundingOptions) with
        keyword `overrides` (damp=0.05, scale_search="imatrix", ...). scale_search: how each
        group's scale and zero are chosen (methods/grid.py; imatrix weighs by H's diagonal);
        token_weights: each calibration token's weight in H (methods/token_weights.py)."""
        r = rounding_with(rounding, overrides, "gptq")
        self.options = options_with(GPTQOptions, options, overrides, "gptq").resolved()
        self.grid = grid_spec(r.search)
        self.token_weights = r.weights
        self.module_settings = dict(module_settings or {})

    def _settings(self, ctx, name: str) -> tuple[int, int]:
        full = ctx.full_name(name)
        if full in self.module_settings:
            bits, gs = self.module_settings[full]
            return int(bits), int(gs)
        bits = ctx.settings.bits
        if not float(bits).is_integer():
            raise InputError(f"{full}: fractional --bits {bits} needs per-module settings "
                             f"from a measurement (none given for this module)")
        return int(bits), int(ctx.settings.group_size)

    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        tw = token_weights_for(ctx, self.token_weights)
        return self.quantize_weighted(ctx, tw)

    def quantize_weighted(self, ctx, tw: dict | None) -> dict[str, QuantizedWeight]:
        """Per input group: accumulate H (each token weighted by `tw`, token_weights.py),
        factor it, solve, report. Where H lives follows the
        plan (ctx.decisions.hessian): 'gpu'; 'park', on the GPU but moved to host RAM while
        its factor is prepared and the columns solved; 'cpu', accumulated and solved on the
        host. 'row_slices' splits the solve by output rows."""
        record = _LayerRecord(per_module=ctx.stats.setdefault("modules", {}))
        layer_where, slices = _hessian_placement(ctx.decisions)
        acc_dev = torch.device("cpu") if layer_where == "cpu" else ctx.device
        # Groups of one batch share a capture forward (MoE experts); otherwise one each.
        batches = list(ctx.arch.capture_batches(lambda n: ctx.module(n).in_features))
        widest = max(ctx.module(g[0]).in_features for b in batches for g in b)
        for batch in batches:
            # Only the widest Hessian is parked: a narrower one with its fold fits beside
            # what the plan counts for the widest (parking costs PCIe round trips).
            narrow = len(batch) == 1 and ctx.module(batch[0][0]).in_features < widest
            where = "gpu" if layer_where == "park" and narrow else layer_where
            accs, t_capture = self._capture(ctx, batch, acc_dev, where, tw)
            if len(batch) > 1 and layout_of(ctx).world.distributed:
                self._solve_across_ranks(ctx, batch, accs, where, slices, t_capture, record)
                continue
            for group in batch:
                self._solve_here(ctx, group, accs.pop(group), where, slices, t_capture, record)
        for k, v in record.totals.items():
            ctx.stats[k] = ctx.stats.get(k, 0) + v
        return record.out

    def _capture(self, ctx, batch, acc_dev, where: str, tw):
        """The batch's Hessian accumulators (one capture forward), and the capture seconds
        per group."""
        t0 = time.perf_counter()
        # park: the shard fold's running total waits in host RAM, where the solve
        # wants H anyway, so the GPU holds one n×n matrix while accumulating
        accs = group_hessians(ctx, batch, acc_dev,
                              host_total=where == "park" and ctx.device.type == "cuda",
                              token_weights=tw)
        _sync(ctx.device)
        ctx.mark(f"calibrate {batch[0][0]}" + (f" +{len(batch) - 1}" if len(batch) > 1
                                               else ""))
        return accs, (time.perf_counter() - t0) / len(batch)

    def _solve_here(self, ctx, group, acc, where, slices, t_capture, record) -> None:
        """Solve, report and swap in one group on this rank."""
        qs, info, seconds, H = self._solve_group(ctx, group, acc, where, slices)
        ctx.mark(f"solve {group[0]}")
        errors = self._report(ctx, group, qs, H, where, slices)
        ctx.mark(f"report {group[0]}")
        # H goes before the quantized weights come in (the plan counts one or the
        # other beside the layer, not both)
        del H
        acc.H = None
        self._finish_group(ctx, group, acc.n_tokens, qs, info, errors, t_capture, seconds,
                           record)

    def _solve_across_ranks(self, ctx, batch, accs, where, slices, t_capture, record) -> None:
        """MoE experts: independent groups, each a unit solved on one rank while the others
        solve theirs (every rank holds every folded H for the report)."""
        hs = {g: accs[g].H for g in batch}  # 'park' drops acc.H on the solving rank
        solved = run_units(layout_of(ctx), list(batch), lambda g: self._solve_group(
            ctx, g, accs[g], where, slices, parallel=False)[:3])
        for group, (qs, info, seconds) in zip(batch, solved):
            acc = accs.pop(group)
            errors = self._report(ctx, group, qs, hs.pop(group), where, slices)
            acc.H = None
            self._finish_group(ctx, group, acc.n_tokens, qs, info, errors, t_capture,
                               seconds, record)

    def _solve_group(self, ctx, group, acc, where: str = "gpu", slices: int = 1,
                     parallel: bool = True):
        """GPTQ one input group against its Hessian: (codes per linear, info, seconds, H).
        where: the plan's Hessian placement (gpu; park: H waits in host memory while its
        factor is made and the columns solved; cpu: accumulated and solved on the host)."""
        t1 = time.perf_counter()
        H = acc.H
        if where == "park" and H.is_cuda:
            H = park(H)
            acc.H = None  # the GPU copy goes now: its factor takes its place
        solve_dev = torch.device("cpu") if where == "cpu" else ctx.device
        settings = {name: self._settings(ctx, name) for name in group}
        opts = self.options
        prepared = prepare_hessian(H, opts.act_order, opts.damp, device=solve_dev)
        if prepared.retries:
            log.warning("gptq: %s (+%d sharing its input) needed damp=%g after %d failed "
                        "Cholesky attempt(s)", ctx.full_name(group[0]), len(group) - 1,
                        prepared.damp_used, prepared.retries)
        qs, _ = quantize_group(ctx, group, H, settings, ctx.settings.symmetric, opts, prepared,
                               row_slices=slices, parallel=parallel, grid=self.grid)
        info = {"damp_used": prepared.damp_used, "retries": prepared.retries,
                "dead_columns": int(prepared.dead.sum())}
        del prepared  # U is not needed for the report: H comes back in its place
        _sync(ctx.device)
        return qs, info, time.perf_counter() - t1, H

    def _report(self, ctx, group, qs, H, where, slices) -> dict:
        """{linear: (output error against H, relative weight error)}, or {} when the report
        is off. H may wait in host RAM ('park'): it comes back for this."""
        if not self.options.report_error:
            return {}
        if H.device != ctx.device and where != "cpu":
            H = H.to(ctx.device)
        # the float weight is replaced afterwards; a caller comparing later sees 0
        return {name: report_errors(ctx.module(name).weight.data, qs[name], H, slices)
                for name in group}

    def _finish_group(self, ctx, group, tokens, qs, info, errors, t_capture, seconds,
                      record: _LayerRecord) -> None:
        """Record the group, then swap in its quantized weights."""
        per_module, totals = record.per_module, record.totals
        for name in group:
            bits, gs = self._settings(ctx, name)
            rec = {"hessian_s": t_capture, "solve_s": seconds, "bits": bits,
                   "group_size": gs, **info, "tokens": tokens, "shared_with": list(group)}
            if name in errors:
                rec["rel_error"], rec["weight_error"] = errors[name]
            per_module[name] = rec
        totals["hessian_s"] += t_capture
        totals["solve_s"] += seconds
        totals["damp_retries"] += info["retries"]
        if ctx.device.type == "cuda":
            # The next group's n×n matrices differ in size: without this the cached blocks
            # of this one stay reserved beside them (H100 7B: reserved 1.45× allocated).
            torch.cuda.empty_cache()
        # Later groups must see this group's quantized outputs (true-sequential).
        for name in group:
            ctx.set_quantized(name, qs[name])
        record.out.update(qs)

