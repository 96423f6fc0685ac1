"""The bits-per-weight optimiser: equal to brute force on small cases, never above the target,
close to it on a realistic 80-layer measurement, fast, and a clear error when infeasible."""
import itertools
import math
import random
import time

import numpy as np
import pytest

from quantizer.errors import InputError
from quantizer.measurements.optimizer import Candidate, Group, choose


def brute_force(groups, target):
    total = sum(g.numel for g in groups)
    best = None
    for combo in itertools.product(*(range(len(g.candidates)) for g in groups)):
        bits = math.fsum(g.numel * g.candidates[c].bpw for g, c in zip(groups, combo))
        # the same relative tolerance the optimiser and check_choice allow: a target drawn at
        # the bottom of the range must not become infeasible through float rounding alone
        if bits <= target * total * (1 + 1e-12):
            obj = math.fsum(g.weight * g.candidates[c].err for g, c in zip(groups, combo))
            if best is None or obj < best:
                best = obj
    return best


def achieved(groups, idx):
    return (math.fsum(g.numel * g.candidates[c].bpw for g, c in zip(groups, idx))
            / sum(g.numel for g in groups))


def objective(groups, idx):
    return math.fsum(g.weight * g.candidates[c].err for g, c in zip(groups, idx))


def check_choice(groups, target, ch):
    assert len(ch.indices) == len(groups)
    assert ch.bpw == pytest.approx(achieved(groups, ch.indices), rel=1e-12)
    assert achieved(groups, ch.indices) <= target * (1 + 1e-12)
    assert ch.objective == pytest.approx(objective(groups, ch.indices), rel=1e-12, abs=1e-15)
    assert ch.lower_bound <= ch.objective + 1e-12


def storage_case(rng, n_groups, n_cands):
    """Storage costs as they really are: integer bits (numel × bpw with bpw in 1/64 steps)."""
    groups = []
    for _ in range(n_groups):
        numel = int(rng.integers(1, 64)) * 64
        bpw = np.sort(rng.choice(np.arange(2 * 64, 9 * 64), n_cands, replace=False)) / 64
        err = np.sort(rng.random(n_cands))[::-1] * rng.uniform(0.5, 2)
        if rng.random() < 0.3:  # not always monotone: a worse setting may cost more
            err = rng.permutation(err)
        groups.append(Group(numel, [Candidate(float(b), float(e)) for b, e in zip(bpw, err)],
                            weight=float(rng.uniform(0.2, 3))))
    return groups


def bpw_range(groups):
    total = sum(g.numel for g in groups)
    lo = sum(g.numel * min(c.bpw for c in g.candidates) for g in groups) / total
    hi = sum(g.numel * max(c.bpw for c in g.candidates) for g in groups) / total
    return lo, hi


def test_equals_brute_force_on_small_storage_cases():
    base = random.randrange(10**6)
    for seed in range(base, base + 150):
        rng = np.random.default_rng(seed)
        groups = storage_case(rng, 4, 4)
        lo, hi = bpw_range(groups)
        target = float(rng.uniform(lo, hi + 0.2))
        ch = choose(groups, target)
        check_choice(groups, target, ch)
        assert ch.exact, seed
        assert ch.objective == pytest.approx(brute_force(groups, target), abs=1e-12), seed


def test_bound_holds_with_arbitrary_float_costs():
    """Non-integral costs and ragged candidate lists: the answer is feasible, the reported lower
    bound really is below the optimum, and when the optimiser claims exactness it is."""
    base = random.randrange(10**6)
    optimal = 0
    for seed in range(base, base + 150):
        rng = np.random.default_rng(seed)
        groups = [Group(float(rng.uniform(100, 5000)),
                        [Candidate(float(rng.uniform(2, 9)), float(rng.random()))
                         for _ in range(int(rng.integers(1, 6)))], weight=float(rng.random()))
                  for _ in range(int(rng.integers(1, 6)))]
        lo, hi = bpw_range(groups)
        target = float(rng.uniform(lo, hi))
        ch = choose(groups, target)
        check_choice(groups, target, ch)
        best = brute_force(groups, target)
        assert ch.lower_bound <= best + 1e-12 and best <= ch.objective + 1e-12, seed
        if ch.exact:
            assert ch.objective == pytest.approx(best, abs=1e-12), seed
        optimal += math.isclose(ch.objective, best, abs_tol=1e-12)
    assert optimal >= 145  # near-optimal in the rare rest (fine DP grid), never infeasible


def test_target_at_the_minimum_and_infeasible_target():
    rng = np.random.default_rng(random.randrange(10**6))
    groups = storage_case(rng, 5, 4)
    lo, _ = bpw_range(groups)
    ch = choose(groups, lo)
    check_choice(groups, lo, ch)
    assert ch.bpw == pytest.approx(lo)
    with pytest.raises(InputError, match=rf"below the smallest possible {lo:.4f} bpw"):
        choose(groups, lo - 0.01)
    with pytest.raises(InputError, match="no measured candidates"):
        choose([Group(10, [])], 4.0)


LINEARS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
           (14336, 4096), (14336, 4096), (4096, 14336)]  # q k v o gate up down (out, in)
SETTINGS = [(b, gs) for b in (2, 3, 4, 5, 6, 8) for gs in (32, 128)]


def realistic_measurement(rng, layers=80):
    """80 layers × 7 groups × 12 candidates with the storage cost of asymmetric int-b with an
    fp16 scale and a b-bit zero per group, and errors that halve per extra bit (edges and
    some modules more sensitive)."""
    groups = []
    for layer in range(layers):
        edge = 3.0 if layer < 2 or layer >= layers - 2 else 1.0
        for out_f, in_f in LINEARS:
            sens = edge * rng.lognormal(0, 0.5)
            cands = [Candidate(b + (16 + b) / gs,
                               sens * 2.0 ** -b * (1.15 if gs == 128 else 1.0)
                               * rng.uniform(0.9, 1.1), f"{b}b g{gs}")
                     for b, gs in SETTINGS]
            groups.append(Group(out_f * in_f, cands, name=f"{layer}"))
    return groups


def test_realistic_80_layers_hits_target_fast_and_beats_uniform():
    rng = np.random.default_rng(random.randrange(10**6))
    groups = realistic_measurement(rng)
    uniform_4b = 4 + 20 / 128  # uniform 4-bit g128: its real cost
    for target in (2.5, 3.0, 3.5, 4.0, uniform_4b, 5.0, 6.0):
        t0 = time.perf_counter()
        ch = choose(groups, target)
        dt = time.perf_counter() - t0
        print(f"target {target:.4f}: {ch.bpw:.5f} bpw, {dt * 1000:.0f} ms, {ch.method}, "
              f"exact={ch.exact}, gap {ch.gap / ch.objective:.1e}, {'; '.join(ch.notes)}")
        check_choice(groups, target, ch)
        assert target - ch.bpw <= 0.01
        assert ch.gap <= 1e-3 * ch.objective  # provably within 0.1% of the optimum
        assert dt < 5.0  # generous: measured ~0.1-0.3 s on one shared CPU core
    uniform = [SETTINGS.index((4, 128))] * len(groups)
    ch = choose(groups, uniform_4b)
    assert ch.objective <= objective(groups, uniform) * (1 - 1e-3)  # mixing must pay


def test_tied_groups_share_one_label_and_the_optimum_is_exact():
    """Ties (every expert of a MoE layer one setting, for vLLM's fused-MoE layer): the
    answer equals brute force over the choices that give tied groups one label, and the
    bits target holds under the constraint."""
    from quantizer.measurements.optimizer import min_bpw

    rng = random.Random(7)
    labels = ["2b", "3b", "4b", "8b"]
    groups = [Group(rng.randrange(50, 400),
                    [Candidate(int(lab[0]) + 0.25, rng.random() / int(lab[0]), lab)
                     for lab in labels if not (i == 4 and lab == "2b")])
              for i in range(6)]
    ties = [[1, 2, 4]]  # group 4 lacks "2b": the tie cannot take it
    total = sum(g.numel for g in groups)
    for target in (3.0, 3.6, 4.4, 6.0):
        if target < min_bpw(groups, None, ties):
            with pytest.raises(InputError):
                choose(groups, target, ties=ties)
            continue
        got = choose(groups, target, ties=ties)
        picked = [groups[i].candidates[k].label for i, k in enumerate(got.indices)]
        assert len({picked[i] for i in ties[0]}) == 1 and picked[4] != "2b"
        best = None
        for combo in itertools.product(*(range(len(g.candidates)) for g in groups)):
            if len({groups[i].candidates[combo[i]].label for i in ties[0]}) > 1:
                continue
            bits = sum(g.numel * g.candidates[k].bpw for g, k in zip(groups, combo))
            if bits > target * total + 1e-9:
                continue
            obj = sum(g.weight * g.candidates[k].err for g, k in zip(groups, combo))
            best = obj if best is None else min(best, obj)
        assert got.bpw <= target + 1e-12 and got.objective == pytest.approx(best, rel=1e-9)
    assert min_bpw(groups, None, ties) > min_bpw(groups)  # the tie costs bits at the low end
