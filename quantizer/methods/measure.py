"""Measurement pass: for every module group of a layer and every candidate setting, the
relative output error ‖Y−Ŷ‖/‖Y‖ on the calibration data and the exact storage cost in bits
per weight. The bpw optimiser (quantizer.measurements) then picks one candidate per group.

Groups are the architecture's input groups (q/k/v, o, gate/up, down): they are also the
linears vLLM fuses (qkv_proj, gate_up_proj) and, being one Hessian each, the unit GPTQ works on.

Errors come from the group's Hessian, no second forward: with H ∝ XᵀX,
‖(W−Ŵ)Xᵀ‖² = tr((W−Ŵ) H (W−Ŵ)ᵀ), summed over the group's linears (Y is their concatenated
output). Hessians are taken on the float layer (no predecessor quantized), so every
candidate of every group is judged on the same inputs.

Mixtures: a candidate may give the group's first linear one setting and the others another
(q at 4 bits with k/v at 5; gate at 4 with up at 5). Mixing *within* a linear (ExLlamaV2's
row splits) is not used because no vLLM-loadable format stores two widths in one weight;
per-linear widths are what compressed-tensors config_groups express. vLLM does fuse q/k/v
and gate/up and wants one scheme per fused linear, so mixture results carry
"uniform": false and an exporter aiming at vLLM drops them before optimising
(export/serving.py `candidate_servable`). A mixture costs no extra quantization: each linear's result per
setting is computed once and reused by every candidate that names it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..settings import GPTQOptions, RoundingOptions
from .block_error import judge_for
from .gptq import group_hessians, prepare_hessian, quantize_group
from .grid import grid_spec
from .token_weights import token_weights_for
from .residual_share import block_of


@dataclass(frozen=True)
class Setting:
    bits: int
    group_size: int  # -1 = per output channel

    @property
    def label(self) -> str:
        return f"{self.bits}b {'ch' if self.group_size == -1 else f'g{self.group_size}'}"

    def fits(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0


@dataclass(frozen=True)
class CandidateSpec:
    """How to quantize one module group: `first` for the group's first linear, `rest` for
    the others (None: every linear at `first`, a uniform candidate)."""

    first: Setting
    rest: Setting | None = None

    @property
    def uniform(self) -> bool:
        return self.rest is None or self.rest == self.first

    @property
    def label(self) -> str:
        if self.uniform or self.rest is None:
            return self.first.label
        return f"{self.first.label} + {self.rest.label}"

    def settings_for(self, group: tuple[str, ...], in_features: int) -> dict[str, Setting] | None:
        """Per-linear settings, or None when the candidate does not apply to this group (a
        mixture on a one-linear group, a group size that does not divide the width)."""
        if not self.uniform and len(group) < 2:
            return None
        rest = self.first if self.uniform or self.rest is None else self.rest
        settings = {name: (self.first if i == 0 else rest) for i, name in enumerate(group)}
        if not all(s.fits(in_features) for s in settings.values()):
            return None
        return settings


def default_candidates(allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8),
                       mixtures: bool = True) -> list[CandidateSpec]:
    """About a dozen candidates spanning 2-8 bits, like ExLlamaV2's measurement: small groups
    where few bits need them, g128 above 4 bits, and 3/4, 4/5 and 4/6 per-linear mixtures."""
    uniform = [(2, 32), (2, 64), (3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128),
               (5, 128), (6, 128), (8, 128)]
    mixed = [((3, 128), (4, 128)), ((4, 128), (5, 128)), ((4, 128), (6, 128))]
    out = [CandidateSpec(Setting(b, g)) for b, g in uniform if b in allowed_bits]
    if mixtures:
        out += [CandidateSpec(Setting(*a), Setting(*b)) for a, b in mixed
                if a[0] in allowed_bits and b[0] in allowed_bits]
    return out


COVER_GROUP_SIZES = (128, 64, 32, -1)


def plans_for(candidates: list[CandidateSpec], group: tuple[str, ...], in_features: int
              ) -> list[tuple[CandidateSpec, dict[str, Setting]]]:
    """The candidates that apply to this group, with their per-linear settings. Candidates
    whose group size does not divide the width are skipped; a bit width left with no uniform
    candidate at all (e.g. every g128 setting on a 576-wide input) gets one at the largest
    of 128/64/32/per-channel that fits, so the optimiser never loses a whole width."""
    found = [(c, c.settings_for(group, in_features)) for c in candidates]
    plans = [(c, s) for c, s in found if s is not None]
    covered = {c.first.bits for c, _ in plans if c.uniform}
    wanted = dict.fromkeys(c.first.bits for c in candidates if c.uniform)
    for bits in wanted:
        if bits in covered:
            continue
        for gs in COVER_GROUP_SIZES:
            spec = CandidateSpec(Setting(bits, gs))
            settings = spec.settings_for(group, in_features)
            if settings is not None:
                plans.append((spec, settings))
                break
    return plans


@dataclass
class CandidateResult:
    label: str
    err: float  # relative output error of the whole group
    bpw: float  # exact storage bits per weight (codes + fp16 scales + zeros + g_idx)
    bits: float  # numel-weighted mean code width
    group_size: int | None  # common group size, None when the linears differ
    numel: int  # weights in the group
    modules: dict[str, Setting] = field(default_factory=dict)
    uniform: bool = True
    storage_bits: int = 0
    parts: list[dict] = field(default_factory=list)  # mixtures: share of weights per setting
    # relative error of the group's block output (methods/block_error.py); None where the
    # group's own output is the block's (o_proj, down_proj) or for routed experts
    block_err: float | None = None

    def to_dict(self) -> dict:
        """The measurement.json candidate: everything needed to quantize it again."""
        d = {"label": self.label, "bits": round(self.bits, 6), "group_size": self.group_size,
             "bpw": self.bpw, "err": self.err, "uniform": self.uniform,
             "storage_bits": self.storage_bits,
             "modules": {m: {"bits": s.bits, "group_size": s.group_size}
                         for m, s in self.modules.items()}}
        if not self.uniform:
            d["parts"] = self.parts
        if self.block_err is not None:
            d["block_err"] = self.block_err
        return d


def group_label(group: tuple[str, ...]) -> str:
    """'mlp.down_proj'; 'self_attn.q_proj+k_proj+v_proj' for a group sharing a parent."""
    if len(group) == 1:
        return group[0]
    parents = {n.rpartition(".")[0] for n in group}
    if len(parents) == 1:
        parent = parents.pop()
        return f"{parent}." + "+".join(n.rpartition(".")[2] for n in group)
    return "+".join(group)


@dataclass
class _Clock:
    """Seconds and GPTQ solves of one measure_layer call (added to ctx.stats)."""

    hessian_s: float = 0.0
    solve_s: float = 0.0
    block_s: float = 0.0
    solves: int = 0

    def add_to(self, stats: dict) -> None:
        stats["measure_hessian_s"] = stats.get("measure_hessian_s", 0.0) + self.hessian_s
        stats["measure_solve_s"] = stats.get("measure_solve_s", 0.0) + self.solve_s
        stats["measure_solves"] = stats.get("measure_solves", 0) + self.solves
        stats["measure_block_s"] = stats.get("measure_block_s", 0.0) + self.block_s


@torch.no_grad()
def measure_layer(ctx, candidates: list[CandidateSpec] | None = None,
                  options: GPTQOptions | None = None, rounding: RoundingOptions | None = None
                  ) -> dict[str, list[CandidateResult]]:
    """{group label: [CandidateResult, ...]} for one layer; the layer's weights are left as
    they were (float). `options`: GPTQ's, `rounding`: scale_search and token_weights as GPTQ
    takes them (default: ctx.settings'): with token weights every error (Hessian and block
    judge) weighs tokens by what the next RMSNorm makes of them. Timings and the number of
    GPTQ solves go to ctx.stats."""
    options = (options or ctx.settings.gptq).resolved()
    rounding = rounding or ctx.settings.rounding
    candidates = default_candidates() if candidates is None else list(candidates)
    groups = list(ctx.arch.input_groups)
    clock = _Clock()
    t0 = time.perf_counter()
    tw = token_weights_for(ctx, rounding.weights)
    hessians = group_hessians(ctx, groups, token_weights=tw)
    clock.hessian_s = time.perf_counter() - t0
    solver = _Solver(ctx, options, grid_spec(rounding.search))
    results: dict[str, list[CandidateResult]] = {}
    judges: dict = {}  # block name -> BlockJudge, while its groups are measured
    for group in groups:
        judge = _judge_of(ctx, group, judges, tw, clock)
        plans = plans_for(candidates, group, ctx.module(group[0]).in_features)
        H = hessians.pop(group).live_H()
        results[group_label(group)] = _measure_group(solver, group, H, plans, judge, clock)
        del H  # before the next group's solves
    clock.add_to(ctx.stats)
    return results


def _judge_of(ctx, group, judges: dict, tw, clock: _Clock):
    """The block judge of `group` (None where its output is the block's own); past a block's
    last judged group its cached tokens are freed."""
    t = time.perf_counter()
    judge = judge_for(ctx, group, judges, tw)
    if judge is None:
        judges.clear()
    clock.block_s += time.perf_counter() - t
    return judge


@dataclass
class _Solver:
    """GPTQ of some of a group's linears at one setting, as measure_layer runs it."""

    ctx: Any  # LayerContext
    options: GPTQOptions
    grid: Any  # grid_spec(...)

    def quantize(self, members: tuple[str, ...], setting: Setting, prepared) -> dict:
        qs, _ = quantize_group(self.ctx, members, None,
                               {n: (setting.bits, setting.group_size) for n in members},
                               bool(self.ctx.settings.symmetric), self.options, prepared,
                               grid=self.grid)
        return qs


def _measure_group(solver: _Solver, group, H, plans, judge, clock: _Clock
                   ) -> list[CandidateResult]:
    """One group's results: every setting its candidates name is quantized once, giving
    ‖(W-Ŵ)X‖² = tr((W-Ŵ) H (W-Ŵ)ᵀ) and storage bits per linear; a candidate's error sums the
    settings it names, relative to ‖W X‖²."""
    t1 = time.perf_counter()
    prepared = prepare_hessian(H, bool(solver.options.act_order), solver.options.damp)
    weights = {n: solver.ctx.module(n).weight.data.to(H.device, torch.float32) for n in group}
    signal = {n: float(((w @ H) * w).sum()) for n, w in weights.items()}  # ‖W X‖² per linear
    block = _BlockErrors(judge, plans)
    per_setting: dict[Setting, dict[str, tuple[float, int]]] = {}
    for setting in dict.fromkeys(s for _, ss in plans for s in ss.values()):
        members = tuple(n for n in group if any(ss.get(n) == setting for _, ss in plans))
        qs = solver.quantize(members, setting, prepared)
        clock.solves += 1
        per_setting[setting] = {n: _error_and_bits(weights[n], qs[n], H) for n in members}
        block.on_quantized(setting, qs)
        del qs
    clock.solve_s += time.perf_counter() - t1 - block.seconds
    block_err = block.finish()
    clock.block_s += block.seconds
    den = sum(signal.values())
    sizes = {n: weights[n].numel() for n in group}
    return [_candidate_result(cand, settings, per_setting, sizes, den,
                              block_err.get(cand.label)) for cand, settings in plans]


def _error_and_bits(w, q, H) -> tuple[float, int]:
    """(‖(W-Ŵ)X‖² up to the Hessian's scale, storage bits) of one quantized linear."""
    d = w - q.dequantize(torch.float32).to(H.device)
    return float(((d @ H) * d).sum()), q.storage_bits()


class _BlockErrors:
    """Block-output errors of a group's candidates (none without a judge): a uniform candidate
    is judged as soon as its setting is quantized; the settings a mixture names are kept (the
    codes, a byte per weight) and the mixture judged at the end."""

    def __init__(self, judge, plans):
        self.judge, self.plans = judge, plans
        self.mixed = {s for c, ss in plans if not c.uniform for s in ss.values()}
        self.kept: dict = {}
        self.errors: dict[str, float] = {}
        self.seconds = 0.0

    def on_quantized(self, setting: Setting, qs: dict) -> None:
        if self.judge is None:
            return
        t = time.perf_counter()
        for cand, ss in self.plans:
            if set(ss.values()) == {setting}:
                self.errors[cand.label] = self.judge.error({n: qs[n] for n in ss})
        if setting in self.mixed:
            self.kept[setting] = qs
        self.seconds += time.perf_counter() - t

    def finish(self) -> dict[str, float]:
        if self.judge is None:
            return self.errors
        t = time.perf_counter()
        for cand, ss in self.plans:
            if cand.label not in self.errors:
                self.errors[cand.label] = self.judge.error(
                    {n: self.kept[s][n] for n, s in ss.items()})
        self.kept.clear()
        self.seconds += time.perf_counter() - t
        return self.errors


def _candidate_result(cand: CandidateSpec, settings: dict[str, Setting], per_setting,
                      sizes: dict[str, int], den: float, block_err: float | None
                      ) -> CandidateResult:
    """A candidate's result from its per-linear settings' errors and storage bits."""
    numel = sum(sizes.values())
    num = sum(per_setting[s][n][0] for n, s in settings.items())
    bits_on_disk = sum(per_setting[s][n][1] for n, s in settings.items())
    gsz = {s.group_size for s in settings.values()}
    share: dict[Setting, int] = {}
    for n, s in settings.items():
        share[s] = share.get(s, 0) + sizes[n]
    return CandidateResult(
        label=cand.label, err=(max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0,
        bpw=bits_on_disk / numel,
        bits=sum(s.bits * sizes[n] for n, s in settings.items()) / numel,
        group_size=gsz.pop() if len(gsz) == 1 else None, numel=numel,
        modules=dict(settings), uniform=len(share) == 1, storage_bits=bits_on_disk,
        parts=[{"bits": s.bits, "group_size": s.group_size, "fraction": k / numel}
               for s, k in share.items()], block_err=block_err)


def store_groups(ctx, results: dict[str, list[CandidateResult]]) -> dict[str, dict]:
    """One layer's results in measurement.json form (MeasurementStore.record_layer)."""
    by_label = {group_label(g): g for g in ctx.arch.input_groups}
    return {label: {"numel": res[0].numel, "modules": list(by_label[label]),
                    "block": block_of(by_label[label][0]),
                    "candidates": [r.to_dict() for r in res]}
            for label, res in results.items()}


def module_settings_from_selection(selection: dict[int, dict[str, dict]], arch
                                   ) -> dict[str, tuple[int, int]]:
    """MeasurementStore.selection(choice) -> {full module name: (bits, group_size)}, what
    GPTQ(module_settings=...) and the compressed-tensors config take."""
    out = {}
    for index, groups in selection.items():
        prefix = arch.layer_prefix(int(index))
        for cand in groups.values():
            for module, s in cand["modules"].items():
                out[f"{prefix}.{module}"] = (int(s["bits"]), int(s["group_size"]))
    return out


__all__ = ["CandidateResult", "CandidateSpec", "Setting", "default_candidates", "group_label",
           "measure_layer", "module_settings_from_selection", "store_groups"]
