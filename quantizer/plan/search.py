"""The planner's search over decisions.

Every device starts from the fastest configuration (hidden states, Hessians and the whole layer
on the GPU; the largest power-of-two chunk) and applies moves in a fixed order of increasing
cost (see MOVES) — at each step the cheapest move that lowers the predicted peak — until the
peak fits the budget. The sequence of configurations does not depend on the budget, only where
it stops does; so a smaller budget never gets a configuration that uses more GPU memory, and
the last configuration of the sequence is the smallest budget that works: that is the number a
refusal quotes."""
from __future__ import annotations

from dataclasses import replace

from .memory import Peak, device_peak, ram_peak
from .terms import Decisions, PlanJob

# Tokens per forward beyond which a larger chunk buys no speed, only memory: the first chunk
# never exceeds it (the layer loop runs the planned chunk as it is).
MAX_CHUNK_TOKENS = 4096
MAX_ROW_SLICES = 32

# Moves from the fastest configuration, cheapest first. Each is taken only when it lowers the
# predicted peak. "by_group" (stream modules in for the forward) is modelled but the layer loop
# does not carry it out, so neither the search nor OOM recovery takes it.
MOVES = ("hidden_off_gpu", "hessian_park", "row_slices", "experts", "chunk", "hessian_off_gpu")


def ram_ok(job: PlanJob, dec: Decisions, ram_budget: int) -> bool:
    return job.on_host or ram_peak(job, dec)[0] <= ram_budget


def apply_move(move: str, job: PlanJob, dec: Decisions, ram_budget: int) -> Decisions | None:
    hidden_forced, hessian_forced = job.forced
    if move == "chunk" and dec.chunk > 1:
        return replace(dec, chunk=dec.chunk // 2)
    if move == "row_slices" and dec.row_slices < MAX_ROW_SLICES:
        return replace(dec, row_slices=dec.row_slices * 2)
    if move == "hidden_off_gpu" and hidden_forced == "auto" and job.holds_hidden:
        if job.on_host:  # the host is the device: only disk frees its memory
            return replace(dec, hidden="disk") if dec.hidden == "cpu" else None
        if dec.hidden == "gpu":
            to_cpu = replace(dec, hidden="cpu")
            return to_cpu if ram_ok(job, to_cpu, ram_budget) else replace(dec, hidden="disk")
    if (move == "hessian_park" and job.uses_gptq and hessian_forced == "auto"
            and dec.hessian == "gpu" and not job.on_host):
        return replace(dec, hessian="park")  # a few GB over PCIe per layer: cheap
    if move == "by_group" and dec.mode == "whole":
        return replace(dec, mode="by_group")
    if move == "experts" and dec.experts_per_pass > 1:
        return replace(dec, experts_per_pass=dec.experts_per_pass // 2)
    if (move == "hessian_off_gpu" and job.uses_gptq and hessian_forced == "auto"
            and dec.hessian in ("gpu", "park") and not job.on_host):
        moved = replace(dec, hessian="cpu")
        if ram_ok(job, moved, ram_budget):
            return moved
        if moved.hidden == "cpu" and hidden_forced == "auto":
            moved = replace(moved, hidden="disk")
            return moved if ram_ok(job, moved, ram_budget) else None
    return None


def start(job: PlanJob) -> Decisions:
    hidden_forced, hessian_forced = job.forced
    hidden = hidden_forced if hidden_forced != "auto" else ("cpu" if job.on_host else "gpu")
    if not job.uses_gptq:
        hessian = "none"
    else:
        hessian = "cpu" if job.on_host else (hessian_forced if hessian_forced != "auto"
                                             else "gpu")
    chunk = 1
    while chunk * 2 <= job.samples and chunk * 2 * job.seqlen <= MAX_CHUNK_TOKENS:
        chunk *= 2
    experts = max((g.copies for groups, _ in job.kinds for g in groups if g.copies > 1),
                  default=0)
    return Decisions(hidden=hidden if job.holds_hidden else "none", hessian=hessian,
                     mode="whole", chunk=chunk if job.holds_hidden else 1, row_slices=1,
                     experts_per_pass=experts)


def search(job: PlanJob, budget: int, ram_budget: int
            ) -> tuple[Decisions, Peak, tuple[str, ...], bool]:
    """Walk the fixed move sequence until the peak fits; (decisions, peak, steps, fits)."""
    dec = start(job)
    peak = device_peak(job, dec)
    steps: list[str] = []
    while peak.total > budget or not ram_ok(job, dec, ram_budget):
        for move in MOVES:
            cand = apply_move(move, job, dec, ram_budget)
            if cand is None:
                continue
            cand_peak = device_peak(job, cand)
            if cand_peak.total < peak.total or (
                    not ram_ok(job, dec, ram_budget) and ram_ok(job, cand, ram_budget)):
                dec, peak = cand, cand_peak
                steps.append(move)
                break
        else:
            return dec, peak, tuple(steps), False
    return dec, peak, tuple(steps), True
