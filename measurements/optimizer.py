"""Bits-per-weight optimiser: one candidate per module group, minimising Σ weight·err subject to
Σ numel·bpw ≤ target · Σ numel (a multiple-choice knapsack).

How it gets an answer that is exact, or provably near-optimal, in well under a second for
80 layers × 7 groups × 12 candidates:
1. LP relaxation (Sinha & Zoltners): per group the lower convex hull of (bits, weighted err),
   all hull steps sorted by error saved per bit and taken greedily up to the budget. The price
   λ of the step that no longer fits gives the Lagrangian dual bound `lower` ≤ optimum.
2. Incumbent: the LP's integral steps (and the best uniform setting that fits, when labels
   name one), leftover budget spent greedily, then pair moves (one group gives bits back,
   another spends them) while they help.
3. Reduced-cost fixing: for any choice x, obj(x) = lower + Σ_g r_g(x_g) + λ·(budget − bits(x))
   with every term ≥ 0, so no candidate with r_g > incumbent − lower can be part of a better
   choice. Usually only a few hundred of the thousands of candidates survive.
4. DP over the surviving groups: on the gcd of their storage-bit costs (exact; storage bits
   are integers), else a Pareto-frontier DP on the true costs (exact), else a DP on a fine
   grid with costs rounded *up* (cannot exceed the target; not a proof).
The best feasible answer is returned; it is never worse than any uniform setting that fits.
`Choice.exact` says the optimum was proven; otherwise `Choice.gap` bounds the distance to it.

Ties: groups that must take one setting (a serving engine fuses them, e.g. every expert of
one MoE layer in vLLM) are merged into one group before solving -- its candidates the labels
all members measured, its cost and weighted error the members' sums -- so the same solver
proves the optimum under the constraint, and the target is met with it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError

WORK_LIMIT = 2.5e7  # DP cells (groups × candidates × budget steps) we allow ourselves
GRID_WORK = 5e6  # cells of the rounded-cost DP, which only improves the answer, never proves it
GRID_STEPS = 2**16  # budget steps of the rounded DP when costs are not on an integer grid
FRONTIER_CAP = 20_000  # Pareto points the exact sparse DP may hold before it gives up
PARETO_WORK = 2e6  # partial choices it may look at in all before it gives up


@dataclass
class Candidate:
    bpw: float  # storage bits per weight, scales and zeros included
    err: float  # relative output error of the group with this setting
    label: str = ""


@dataclass
class Group:
    numel: int
    candidates: list[Candidate]
    weight: float = 1.0  # importance of this group's error in the objective
    name: str = ""


@dataclass
class Choice:
    indices: list[int]  # chosen candidate per group (index into that group's candidates)
    bpw: float  # achieved average bits per weight (never above target)
    target: float
    objective: float  # Σ weight·err of the choice
    lower_bound: float  # no choice within the target can have a lower objective
    method: str  # which stage produced the answer
    exact: bool  # True when the DP proved optimality
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return self.objective - self.lower_bound


def _as_candidate(c) -> Candidate:
    return c if isinstance(c, Candidate) else Candidate(*c)


def _lp_greedy(cost, werr, budget):
    """LP relaxation via convex hulls. Returns (indices of its integral part, the multiplier λ:
    error saved per bit at the budget line)."""
    G = cost.shape[0]
    start = np.empty(G, dtype=np.int64)
    steps = []  # (efficiency, group, to_index, dcost, derr)
    for g in range(G):
        cs, es = cost[g].tolist(), werr[g].tolist()  # plain floats: numpy scalars are slow here
        order = sorted((j for j in range(len(cs)) if math.isfinite(cs[j])),
                       key=lambda j: (cs[j], es[j]))
        hull: list[int] = []
        for c in order:
            if hull and es[c] >= es[hull[-1]]:
                continue  # costs more, saves nothing
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b lies on or above the segment a→c: not on the lower hull
                if (es[a] - es[b]) * (cs[c] - cs[a]) <= (es[a] - es[c]) * (cs[b] - cs[a]):
                    hull.pop()
                else:
                    break
            hull.append(c)
        start[g] = hull[0]
        for a, b in zip(hull, hull[1:]):
            dc, de = cs[b] - cs[a], es[a] - es[b]
            steps.append((de / dc, g, b, dc, de))
    steps.sort(key=lambda s: -s[0])  # stable: a group's own steps keep their order
    idx = start.copy()
    left = budget - cost[np.arange(G), idx].sum()
    obj = werr[np.arange(G), idx].sum()
    for eff, g, b, dc, de in steps:
        if dc <= left:
            idx[g], left, obj = b, left - dc, obj - de
        else:
            return idx, eff  # the LP would take this step fractionally: its price per bit
    return idx, 0.0  # every useful step fits: bits cost nothing at the margin


def _fill(idx, cost, werr, budget):
    """Spend leftover budget: repeatedly take the single-group change that fits and lowers the
    objective most."""
    idx = idx.copy()
    rows = np.arange(cost.shape[0])
    for _ in range(4 * cost.shape[0]):
        cur_c, cur_e = cost[rows, idx], werr[rows, idx]
        left = budget - cur_c.sum()
        gain = cur_e[:, None] - werr
        gain[~(cost - cur_c[:, None] <= left)] = 0.0
        g, c = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[g, c] <= 0:
            break
        idx[g] = c
    return idx


def _best_swap(idx, cost, werr, budget):
    """The best pair move (one group gives bits back, another spends them) that fits the budget
    and lowers the objective, as (g_down, c_down, g_up, c_up), or None."""
    rows = np.arange(cost.shape[0])
    cur_c, cur_e = cost[rows, idx], werr[rows, idx]
    slack = budget - cur_c.sum()
    with np.errstate(invalid="ignore"):
        dc, de = cost - cur_c[:, None], werr - cur_e[:, None]
    finite = np.isfinite(dc)
    ug, uc = np.nonzero(finite & (dc > 0) & (de < 0))
    dg, dn = np.nonzero(finite & (dc < 0))
    if not len(ug) or not len(dg):
        return None
    order = np.argsort(dc[ug, uc], kind="stable")
    ug, uc = ug[order], uc[order]
    u_cost, u_err = dc[ug, uc], de[ug, uc]
    # for every budget x: the upgrade costing ≤ x that saves the most error
    running = np.minimum.accumulate(u_err)
    best_at = np.maximum.accumulate(np.where(u_err <= running, np.arange(len(u_err)), 0))
    pos = np.searchsorted(u_cost, slack - dc[dg, dn], side="right") - 1
    has = pos >= 0
    pick = best_at[np.where(has, pos, 0)]
    total = np.where(has & (ug[pick] != dg), de[dg, dn] + u_err[pick], np.inf)
    k = int(np.argmin(total))
    if not total[k] < -1e-12 * max(1.0, float(np.abs(cur_e).sum())):
        return None
    return dg[k], dn[k], ug[pick[k]], uc[pick[k]]


def _improve(idx, cost, werr, budget, rounds=40):
    """Local search: fill the leftover budget, then pair moves until none helps (or `rounds`
    of them: its job is a good incumbent for reduced-cost fixing, not the optimum itself)."""
    idx = _fill(idx, cost, werr, budget)
    for _ in range(rounds):
        move = _best_swap(idx, cost, werr, budget)
        if move is None:
            break
        idx[move[0]], idx[move[2]] = move[1], move[3]
        idx = _fill(idx, cost, werr, budget)
    return idx


def _integral_unit(extra):
    """gcd of the extra costs when they are integers (storage bits usually are), else None."""
    finite = extra[np.isfinite(extra)]
    if finite.size == 0 or finite.max() > 2**52:
        return None
    rounded = np.round(finite)
    if np.abs(finite - rounded).max() > 1e-6:
        return None
    nonzero = rounded[rounded > 0].astype(np.int64)
    return int(np.gcd.reduce(nonzero)) if nonzero.size else 1


def _dp(extra, werr, budget_extra, unit, round_up):
    """Multiple-choice knapsack DP over `budget_extra / unit` steps; returns indices."""
    G, C = extra.shape
    steps = int(budget_extra // unit) if round_up else int(math.floor(budget_extra / unit + 1e-9))
    with np.errstate(invalid="ignore"):
        k = np.ceil(extra / unit - (1e-9 if not round_up else 0.0))
    k[~np.isfinite(extra)] = steps + 1
    k = k.astype(np.int64)
    best = np.zeros(steps + 1)  # best[b]: least error of the groups so far within b steps
    arg = np.zeros((G, steps + 1), dtype=np.int16)
    for g in range(G):
        new = np.full(steps + 1, np.inf)
        row = arg[g]
        for c in range(C):
            s = k[g, c]
            if s > steps:
                continue
            cand = best[: steps + 1 - s] + werr[g, c]
            better = cand < new[s:]
            new[s:][better] = cand[better]
            row[s:][better] = c
        best = new
    idx = np.empty(G, dtype=np.int64)
    b = steps
    for g in range(G - 1, -1, -1):
        idx[g] = arg[g, b]
        b -= k[g, idx[g]]
    return idx


def _pareto_dp(extra, werr, budget_extra, lam, upper):
    """Exact DP on true (float) costs: keep only the Pareto-optimal (bits, error) partial
    choices that can still beat `upper` (Lagrangian bound at λ on the groups not yet chosen).
    Returns indices, or None when the frontier grows past FRONTIER_CAP or the work past
    PARETO_WORK points."""
    G, C = extra.shape
    finite = np.isfinite(extra)
    priced = np.where(finite, werr + lam * np.where(finite, extra, 0.0), np.inf).min(axis=1)
    rest = np.concatenate([np.cumsum(priced[::-1])[::-1][1:], [0.0]])  # Σ over groups after g
    limit = upper + lam * budget_extra
    tol = 1e-9 * max(1.0, abs(limit))
    f_cost, f_err = np.zeros(1), np.zeros(1)
    parents, picks, work = [], [], 0
    for g in range(G):
        cost = (f_cost[:, None] + extra[g][None, :]).ravel()
        err = (f_err[:, None] + werr[g][None, :]).ravel()
        work += cost.size
        # within budget (inf padding drops out) and still able to reach `upper` or better
        ok = np.flatnonzero((cost <= budget_extra) & (err + lam * cost + rest[g] <= limit + tol))
        order = ok[np.lexsort((err[ok], cost[ok]))]
        e = err[order]
        keep = np.ones(len(order), dtype=bool)  # less error than every cheaper point
        keep[1:] = e[1:] < np.minimum.accumulate(e)[:-1]
        order = order[keep]
        if len(order) > FRONTIER_CAP or work > PARETO_WORK or not len(order):
            return None
        f_cost, f_err = cost[order], err[order]
        parents.append(order // C)
        picks.append(order % C)
    idx = np.empty(G, dtype=np.int64)
    p = int(np.argmin(f_err))
    for g in range(G - 1, -1, -1):
        idx[g] = picks[g][p]
        p = int(parents[g][p])
    return idx


def _reduced_dp(cost, werr, budget, keep, total, lam, upper):
    """DP over the groups that still have a choice after fixing. Returns (indices or None,
    exact, note)."""
    G = cost.shape[0]
    kept = [np.flatnonzero(keep[g]) for g in range(G)]
    free = [g for g in range(G) if len(kept[g]) > 1]
    idx = np.array([k[0] for k in kept])
    if not free:
        return idx, True, ""
    Cr = max(len(kept[g]) for g in free)
    sub_cost = np.full((len(free), Cr), np.inf)
    sub_werr = np.full((len(free), Cr), np.inf)
    for i, g in enumerate(free):
        sub_cost[i, : len(kept[g])] = cost[g, kept[g]]
        sub_werr[i, : len(kept[g])] = werr[g, kept[g]]
    fixed = [g for g in range(G) if len(kept[g]) == 1]
    mins = sub_cost.min(axis=1)
    extra = sub_cost - mins[:, None]
    budget_extra = budget - math.fsum(cost[fixed, idx[fixed]]) - math.fsum(mins)
    if budget_extra < 0:
        return None, False, ""
    cells = len(free) * Cr
    unit = _integral_unit(extra)
    if unit is not None and cells * (budget_extra / unit + 1) <= WORK_LIMIT:
        exact, note = True, f"exact DP over {len(free)} free groups"
    else:
        sub_upper = upper - math.fsum(werr[fixed, idx[fixed]])
        sub_idx = _pareto_dp(extra, sub_werr, budget_extra, lam, sub_upper)
        if sub_idx is not None:
            exact, note = True, f"exact Pareto DP over {len(free)} free groups"
            for i, g in enumerate(free):
                idx[g] = kept[g][sub_idx[i]]
            return idx, exact, note
        steps = min(GRID_STEPS, max(1.0, GRID_WORK / cells - 1))
        unit = max(budget_extra, 1e-30) / steps
        if len(free) * unit / total > 0.05:  # too coarse to beat the LP answer: skip
            return None, False, f"DP skipped: {len(free)} free groups need too fine a grid"
        exact, note = False, (f"DP over {len(free)} free groups on a {unit / total:.1e} bpw "
                              f"grid, costs rounded up")
    sub_idx = _dp(extra, sub_werr, budget_extra, unit, round_up=not exact)
    for i, g in enumerate(free):
        idx[g] = kept[g][sub_idx[i]]
    return idx, exact, note


def tie_groups(groups: Sequence[Group], ties: Sequence[Sequence[int]]
               ) -> tuple[list[Group], list[list[int]]]:
    """`groups` with each tie (indices of groups that must share one candidate label) merged
    into one Group, placed at its first member; and, per merged group, its members. A merged
    candidate's bpw is the members' numel-weighted mean and its err the members' Σ weight·err
    (weight 1), so a choice's objective and bits are the same before and after merging."""
    owner: dict[int, int] = {}
    for t, members in enumerate(ties):
        for i in members:
            if i in owner:
                raise InputError(f"group {groups[i].name or i} is in two ties")
            owner[i] = t
    merged, members_of, done = [], [], set()
    for i, g in enumerate(groups):
        if i not in owner:
            merged.append(g)
            members_of.append([i])
            continue
        t = owner[i]
        if t in done:
            continue
        done.add(t)
        idx = list(ties[t])
        cands = [{_as_candidate(c).label: _as_candidate(c) for c in groups[j].candidates}
                 for j in idx]
        common = [lab for lab in cands[0] if lab and all(lab in c for c in cands[1:])]
        if not common:
            raise InputError(f"groups {', '.join(groups[j].name or str(j) for j in idx)} must "
                             f"share one setting but have no measured setting in common")
        numel = sum(groups[j].numel for j in idx)
        merged.append(Group(numel, [Candidate(
            sum(groups[j].numel * c[lab].bpw for j, c in zip(idx, cands)) / numel,
            sum(groups[j].weight * c[lab].err for j, c in zip(idx, cands)), lab)
            for lab in common], 1.0, "+".join(groups[j].name or str(j) for j in idx[:2])
            + ("+..." if len(idx) > 2 else "")))
        members_of.append(idx)
    return merged, members_of


def min_bpw(groups: Sequence[Group], per_weights: float | None = None,
            ties: Sequence[Sequence[int]] = ()) -> float:
    """The smallest average bpw any choice can reach (each group, or tie, at its cheapest)."""
    return _extreme_bpw(groups, per_weights, ties, min)


def max_bpw(groups: Sequence[Group], per_weights: float | None = None,
            ties: Sequence[Sequence[int]] = ()) -> float:
    """The largest average bpw a choice can use (each group, or tie, at its widest)."""
    return _extreme_bpw(groups, per_weights, ties, max)


def _extreme_bpw(groups, per_weights, ties, pick) -> float:
    """The average bpw with every group (or tie) at its `pick` (min / max) candidate."""
    merged = tie_groups(groups, ties)[0] if ties else list(groups)
    total = float(sum(g.numel for g in groups)) if per_weights is None else float(per_weights)
    return math.fsum(g.numel * pick(_as_candidate(c).bpw for c in g.candidates)
                     for g in merged) / total


def choose(groups: Sequence[Group], target_bpw: float, per_weights: float | None = None,
           ties: Sequence[Sequence[int]] = ()) -> Choice:
    """Pick one candidate per group: least Σ weight·err with average bpw ≤ target_bpw.
    The average is over `per_weights` weights (default Σ numel). A model whose export pads
    widths (TP alignment, ragged groups) stores bits for padded weights, yet its bpw is
    counted per weight of the original: pass the original count so the target holds there.
    `ties`: sets of group indices that must take one candidate label (see tie_groups)."""
    if ties:
        return _choose_tied(groups, target_bpw, per_weights, ties)
    t0 = time.perf_counter()
    cost, werr = _cost_and_error(groups)
    total = _weights_total(groups, per_weights)
    budget = _budget(cost, target_bpw, total)
    lp_idx, lam = _lp_greedy(cost, werr, budget)  # 1. LP relaxation
    priced, lower = _lagrangian(cost, werr, lam, budget)
    found, incumbent = _incumbents(groups, lp_idx, cost, werr, budget)  # 2. incumbent
    upper = _score(incumbent, cost, werr)[0]
    keep = _survivors(priced, lower, upper, incumbent)  # 3. reduced-cost fixing
    notes = [f"{int(keep.sum())} of {int(np.isfinite(cost).sum())} candidates survive "
             f"reduced-cost fixing"]
    dp_idx, exact, note = _reduced_dp(cost, werr, budget, keep, total, lam, upper)  # 4. DP
    if note:
        notes.append(note)
    if dp_idx is not None:
        found["exact-dp" if exact else "dp"] = dp_idx if exact else _improve(dp_idx, cost,
                                                                             werr, budget)
    method, exact, lower = _best_found(found, cost, werr, budget, exact, lower)
    obj, bits = _score(found[method], cost, werr)
    return Choice(indices=[int(i) for i in found[method]], bpw=bits / total, target=target_bpw,
                  objective=obj, lower_bound=min(lower, obj), method=method, exact=exact,
                  seconds=time.perf_counter() - t0, notes=notes)


def _choose_tied(groups, target_bpw, per_weights, ties) -> Choice:
    """choose() over the groups with each tie merged, the answer spread back to the members."""
    merged, members_of = tie_groups(groups, ties)
    total = float(sum(g.numel for g in groups)) if per_weights is None else per_weights
    choice = choose(merged, target_bpw, total)
    indices = [0] * len(groups)
    for g, members, k in zip(merged, members_of, choice.indices):
        if len(members) == 1 and g is groups[members[0]]:  # not tied: as chosen
            indices[members[0]] = k
            continue
        label = _as_candidate(g.candidates[k]).label
        for i in members:
            indices[i] = next(j for j, c in enumerate(groups[i].candidates)
                              if _as_candidate(c).label == label)
    choice.indices = indices
    choice.notes.append(f"{len(ties)} tie(s): {len(groups)} groups solved as "
                        f"{len(merged)}")
    return choice


def _cost_and_error(groups):
    """The checked (groups × candidates) matrices of storage bits and weighted error; inf
    where a group has fewer candidates than the widest."""
    if not groups:
        raise InputError("no module groups to choose bit widths for")
    C = max(len(g.candidates) for g in groups)
    cost = np.full((len(groups), C), np.inf)
    werr = np.full((len(groups), C), np.inf)
    for i, g in enumerate(groups):
        if not g.candidates:
            raise InputError(f"group {g.name or i} has no measured candidates")
        if g.numel <= 0 or not g.weight >= 0:
            raise InputError(f"group {g.name or i}: numel must be > 0 and weight >= 0")
        for j, c in enumerate(map(_as_candidate, g.candidates)):
            if not (math.isfinite(c.bpw) and c.bpw > 0 and math.isfinite(c.err) and c.err >= 0):
                raise InputError(f"group {g.name or i} candidate {c.label or j}: bpw must be "
                                 f"positive and err non-negative and finite ({c})")
            cost[i, j] = g.numel * c.bpw
            werr[i, j] = g.weight * c.err
    return cost, werr


def _weights_total(groups, per_weights) -> float:
    """The number of weights the average bpw is over."""
    total = float(sum(g.numel for g in groups)) if per_weights is None else float(per_weights)
    if not total > 0:
        raise InputError(f"per_weights must be positive, got {per_weights}")
    return total


def _budget(cost, target_bpw, total) -> float:
    """The bits a choice may store; refuses a target below the cheapest choice."""
    mins = cost.min(axis=1)
    min_bpw = math.fsum(mins) / total
    if target_bpw < min_bpw * (1 - 1e-12):
        raise InputError(f"target {target_bpw} bits per weight is below the smallest possible "
                         f"{min_bpw:.4f} bpw of the measured candidates; choose a target of at "
                         f"least {math.ceil(min_bpw * 1000) / 1000:.3f}")
    return max(target_bpw * total, math.fsum(mins))  # target == minimum must stay feasible


def _score(ix, cost, werr) -> tuple[float, float]:
    """(Σ weight·err, Σ bits) of the choice `ix`."""
    rows = np.arange(cost.shape[0])
    return (math.fsum(werr[rows, ix]), math.fsum(cost[rows, ix]))


def _lagrangian(cost, werr, lam, budget):
    """Each candidate priced at λ (weighted error + λ·bits), and the Lagrangian dual at λ: a
    lower bound on any choice within the budget."""
    finite = np.isfinite(cost)
    priced = np.where(finite, werr + lam * np.where(finite, cost, 0.0), np.inf)
    return priced, math.fsum(priced.min(axis=1)) - lam * budget


def _uniform_fits(groups, cost, werr, budget):
    """Every uniform setting (same label in every group) that fits the budget."""
    labels = [{_as_candidate(c).label: j for j, c in enumerate(g.candidates)} for g in groups]
    uniform = [np.array([m[label] for m in labels])
               for label in sorted(set.intersection(*(set(m) for m in labels)) - {""})]
    return [ix for ix in uniform if _score(ix, cost, werr)[1] <= budget]


def _incumbents(groups, lp_idx, cost, werr, budget):
    """The answers found so far by stage name, and the incumbent: the LP's integral part (and
    the best uniform setting that fits) with the leftover filled, the better one searched."""
    found = {"lagrangian+fill": _fill(lp_idx, cost, werr, budget)}
    uniform = _uniform_fits(groups, cost, werr, budget)
    if uniform:
        best = min(uniform, key=lambda ix: _score(ix, cost, werr))
        found["uniform+fill"] = _fill(best, cost, werr, budget)
    start = min(found, key=lambda k: _score(found[k], cost, werr))
    found[start.replace("+fill", "+search")] = incumbent = _improve(found[start], cost, werr,
                                                                   budget)
    return found, incumbent


def _survivors(priced, lower, upper, incumbent):
    """Reduced-cost fixing: obj(x) = lower + Σ_g r_g(x_g) + λ·(budget − bits(x)) with every
    term ≥ 0, so a choice beating the incumbent (objective `upper`) uses no candidate with
    r > upper − lower. Returns the mask of candidates that may."""
    reduced = priced - priced.min(axis=1, keepdims=True)
    slack = upper - lower
    keep = reduced <= slack + 1e-9 * max(1.0, abs(slack), abs(lower))
    keep[np.arange(priced.shape[0]), incumbent] = True
    return keep


def _best_found(found, cost, werr, budget, exact, lower):
    """(stage name of the best answer within budget, whether it is proven optimal, the lower
    bound: the exact DP's own value when that DP found a feasible answer)."""
    feasible = {k: v for k, v in found.items() if _score(v, cost, werr)[1] <= budget}
    method = min(feasible, key=lambda k: _score(feasible[k], cost, werr))
    if exact and _score(found["exact-dp"], cost, werr)[1] <= budget:  # the optimum itself
        return method, True, _score(found["exact-dp"], cost, werr)[0]
    return method, False, lower
