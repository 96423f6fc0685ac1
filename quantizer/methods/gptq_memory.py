"""GPTQ's memory terms for the planner (plan/memory.py builds a layer's phases from them):
the n×n Hessians while calibrating (and the running shard fold beside one), the factor and the
column solve by row slices, the error report, and the host memory a parked or host-side
Hessian takes. methods/gptq.py and gptq_hessian.py allocate what these count."""
from __future__ import annotations

from ..arch.base import EXPERT_BATCH_HESSIAN_BYTES
from ..plan.shapes import InputGroup
from ..plan.terms import Decisions, LayerTerms, Phase, PlanJob, Term, alive_copies, swap_in
from .gptq_hessian import hessian_update_bytes


def codes_on_device(dec: Decisions) -> bool:
    """A host solve (Hessians 'cpu') leaves the codes in host RAM: the GPU sees the swap-in."""
    return dec.hessian != "cpu"


def hessian_copies(g: InputGroup, dec: Decisions) -> int:
    """Expert Hessians alive at once: GPTQ captures same-kind expert groups in batches of at
    most EXPERT_BATCH_HESSIAN_BYTES of float32 Hessians (ArchSpec.capture_batches), and the
    plan's experts_per_pass may ask for fewer."""
    k = alive_copies(g, dec)
    if g.copies > 1:
        k = min(k, max(1, EXPERT_BATCH_HESSIAN_BYTES // (4 * g.in_features ** 2)))
    return k


def hessian(g: InputGroup, dec: Decisions) -> Term:
    n, k = g.in_features, hessian_copies(g, dec)
    many = f"{k}× " if k > 1 else ""
    return Term("hessian", f"{many}the {n}×{n} fp32 Hessian of {g.name}", k * n * n * 4)


def _local(t: LayerTerms) -> bool:
    """Hessians accumulated and solved on the device (not on the host)."""
    return t.dec.hessian in ("gpu", "park") or t.job.on_host


def parks(g: InputGroup, groups: tuple[InputGroup, ...], dec: Decisions) -> bool:
    """Whether GPTQ parks this group's Hessian under dec.hessian 'park': the widest input
    group and expert groups do; a narrower dense group keeps H and its fold on the GPU
    (methods/gptq.py GPTQ.quantize_layer)."""
    return dec.hessian == "park" and (
        g.copies > 1 or g.in_features >= max(x.in_features for x in groups))


def calibrate_phase(t: LayerTerms, g: InputGroup) -> Phase:
    job, dec, n = t.job, t.dec, g.in_features
    # XᵀX is added a fixed group of samples at a time (the same bits whatever the chunking):
    # one sample in fp32, or on a GPU a gathered group
    update = Term("hessian_update", f"X^T·X update scratch ({job.seqlen}×{n} per sample)",
                  hessian_update_bytes(n, job.seqlen, job.d, not job.on_host))
    alive = [hessian(g, dec)] if _local(t) else []
    if (dec.hessian == "gpu" or dec.hessian == "park" and not parks(g, t.groups, dec)) \
            and job.samples > 1 and not job.on_host:
        # The shard fold (parallel/shards.py) keeps its running total beside the current
        # shard's partial; under 'park' the total waits in host RAM instead.
        alive.append(Term("hessian", f"the running shard fold of {g.name}'s Hessian",
                          hessian(g, dec).bytes))
    return (f"calibrate {g.name}", t.resident(g, True) + t.held + t.activations + alive
            + [update])


def work_phases(t: LayerTerms, g: InputGroup) -> list[Phase]:
    """The solve of one input group: on the host, or the device phases of _solve_phases."""
    res = t.resident(g, False)
    if not _local(t):  # accumulated and solved on the host
        return [(f"solve {g.name} (host)", res + t.held)]
    return _solve_phases(g, t.dec, t.job.d, res + t.held + t.codes, hessian(g, t.dec),
                         parks(g, t.groups, t.dec))


def _solve_phases(g: InputGroup, dec: Decisions, d: int, base: list[Term], hess: Term,
                  parked: bool) -> list[Phase]:
    """GPTQ's solve of one input group on the GPU (methods/gptq.py, gptq_hessian.py), as
    phases beside `base` (weights, hidden states, the codes so far): preparing the factor (a
    damped copy of H, factored, inverted and factored again in place); the column solve of the
    group's linears stacked by rows, one row slice at a time (U, the slice in the working
    dtype and two fp32 copies: the transposed weight and the codes as floats); the error
    report per linear (two fp32 copies of a row slice: the weight or its error, and that
    times H); the swap-in. The accumulated H is alive throughout unless it is parked in host
    RAM (dec.hessian 'park') from the factor's preparation until the report; it is gone
    before the group's quantized weights are swapped in."""
    n = g.in_features
    rows = -(-sum(lin.out_features for lin in g.linears) // dec.row_slices)
    single = max(g.linears, key=lambda x: x.out_features)
    srows = -(-single.out_features // dec.row_slices)
    held_h = [] if parked else [hess]
    return [
        (f"prepare the factor of {g.name}", base + held_h + [
            Term("cholesky", f"damped copy of H, factored in place, {n}×{n} fp32", n * n * 4)]),
        (f"solve {g.name}", base + held_h + [
            Term("cholesky", f"U, the {n}×{n} fp32 factor of the damped inverse", n * n * 4),
            Term("weight_fp32", f"{g.name} stacked ({rows}×{n} rows slice): working dtype + "
                 f"2 fp32 copies", rows * n * (d + 8))]),
        (f"error report {g.name}", base + [hess, Term(
            "weight_fp32", f"error report of {single.name} ({srows}×{n} rows slice): 2 fp32 "
            f"copies", srows * n * 8)]),
        (f"swap in {g.name}", base + [swap_in(single.out_features * n, d)])]


def final_phases(t: LayerTerms) -> list[Phase]:
    return []  # every group was quantized by its solve


def host_terms(job: PlanJob, groups: tuple[InputGroup, ...], dec: Decisions) -> list[Term]:
    """Host RAM of a GPU run: a Hessian parked during its solve, or Hessians and the solve
    on the host."""
    n = max(g.in_features for g in groups)
    if dec.hessian == "park":
        return [Term("hessian", "a GPTQ Hessian parked during its solve (fp32)", n * n * 4)]
    if dec.hessian != "cpu":
        return []
    alive = max(g.in_features ** 2 * hessian_copies(g, dec) for g in groups)
    wide = max(lin.out_features * lin.in_features for g in groups for lin in g.linears)
    return [Term("hessian", "Hessians + Cholesky workspace (fp32, host)", (alive + n * n) * 4),
            Term("weight_fp32", "fp32 weight being solved + result (host)", wide * (4 + job.d))]
