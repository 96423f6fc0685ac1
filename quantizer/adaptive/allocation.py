"""Adaptive GPTQ's bit allocation: from a measurement (every candidate setting's error and exact
storage cost per module group) to one setting per group meeting a bits-per-weight target,
with the optimiser in measurements/optimizer.py. For vLLM only the candidates it serves, and
one setting for all routed experts of a MoE layer (its fused-MoE module loads one scheme)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ..errors import InputError
from ..export.serving import candidate_servable, expert_block
from ..measurements.optimizer import choose, max_bpw, min_bpw
from ..methods.measure import module_settings_from_selection

log = logging.getLogger(__name__)


def packable(candidate: dict, shapes: dict[str, tuple[int, int]], symmetric: bool) -> bool:
    """Whether pack-quantized can store every module of the candidate: codes pack along the
    input dim, asymmetric zero points along the output dim, into whole int32 words."""
    for name, s in candidate.get("modules", {}).items():
        out_f, in_f = shapes[name]
        bits = int(s["bits"])
        if (in_f * bits) % 32 or (not symmetric and (out_f * bits) % 32):
            return False
    return True


def choose_settings(store, arch, target_bpw: float, symmetric: bool,
                    shapes: dict[str, tuple[int, int]], error_weights: str = "none",
                    original_shapes: dict[str, tuple[int, int]] | None = None,
                    engine: str = "vllm") -> tuple[dict[str, tuple[int, int]], dict]:
    """{full module name: (bits, group_size)} meeting `target_bpw`, and a summary.
    `shapes` maps each linear's name in the layer to (out_features, in_features) as quantized
    (padded); `original_shapes` the same before padding: the target is bits per weight of
    the original model, so padding is paid for out of it;
    `error_weights`: "none" (every group's block error counts alike) or "residual" (weighed
    by its block's residual-stream share, when the file has them).
    `engine` "vllm": only candidates vLLM serves, and every routed expert of a MoE layer
    one setting (vLLM's fused-MoE layer loads one scheme); a target those cannot meet is
    refused naming the smallest that can. "none": every measured candidate."""
    if not store.has_block_errors:
        log.warning("measurement %s has no block errors (measured by an older layerquant): "
                    "comparing each group's own output error; measure again for a better "
                    "allocation", store.path)
    weighted = error_weights == "residual" and store.residual_weighted
    weight = store.residual_weight if weighted else None
    if error_weights == "residual" and not weighted:
        log.warning("measurement %s has no residual shares (measured by an older layerquant): "
                    "every group's error weighs 1; measure again to weigh them", store.path)
    serving = engine == "vllm"
    per_weights = original_weights(store, shapes, original_shapes or shapes)
    groups, ties, allowed_in = allocation_groups(store, shapes, symmetric, engine, weight)
    t0 = time.perf_counter()
    try:
        choice = choose(groups, float(target_bpw), per_weights, ties)
    except InputError:
        if not serving:
            raise
        raise InputError(_below_servable(target_bpw, min_bpw(groups, per_weights, ties))) \
            from None
    selection = store.selection(choice, allowed_for=allowed_in)
    settings = module_settings_from_selection(selection, arch)
    widths: dict[int, int] = {}
    for bits, _ in settings.values():
        widths[bits] = widths.get(bits, 0) + 1
    summary = {"target_bpw": float(target_bpw), "achieved_bpw": choice.bpw,
               "vllm_candidates_only": serving, "engine": engine,
               "tied_moe_layers": len(ties),
               "error_weights": "residual share" if weighted else "none",
               "objective": choice.objective, "optimality_gap": choice.gap,
               "exact": choice.exact, "seconds": time.perf_counter() - t0,
               "modules_per_bits": {str(k): v for k, v in sorted(widths.items())}}
    log.info("bit allocation for %s bpw: %.4f bpw achieved (%s), modules per width %s",
             target_bpw, choice.bpw, "exact" if choice.exact else f"gap {choice.gap:.2e}",
             summary["modules_per_bits"])
    return settings, summary


def _expert_block_of(group: dict, expert_block) -> str | None:
    """The fused-MoE block a measured group belongs to (all its modules routed experts of
    one block), else None."""
    blocks = {expert_block(m) for m in group["modules"]}
    return blocks.pop() if len(blocks) == 1 else None


def _expert_ties(store, experts: dict) -> list[list[int]]:
    """Optimiser group indices (file order, as MeasurementStore.groups) per fused-MoE
    layer: every routed expert's gate/up and down group of one layer."""
    ties: dict[tuple[int, str], list[int]] = {}
    k = 0
    for layer in store.layers:
        for name in layer["groups"]:
            block = experts[(layer["index"], name)]
            if block is not None:
                ties.setdefault((layer["index"], block), []).append(k)
            k += 1
    return [t for t in ties.values() if len(t) > 1]


def allocation_groups(store, shapes: dict[str, tuple[int, int]], symmetric: bool,
                      engine: str, weight=None) -> tuple[list, list[list[int]], object]:
    """The optimiser's view of a measurement for this export: its groups with the candidates
    the export stores (and, engine "vllm", vLLM serves), the ties of every routed expert of a
    fused-MoE layer (vllm), and the per-group filter (for `selection`)."""
    serving = engine == "vllm"
    experts = {(layer["index"], name): _expert_block_of(g, expert_block)
               for layer in store.layers for name, g in layer["groups"].items()}

    def allowed_in(index: int, name: str):
        def allowed(c):
            ok = packable(c, shapes, symmetric)
            return ok and (not serving or candidate_servable(
                c, symmetric, experts[(index, name)] is not None))
        return allowed

    groups = store.groups(weight, allowed_for=allowed_in)
    return groups, (_expert_ties(store, experts) if serving else []), allowed_in


def _below_servable(target: float, smallest: float) -> str:
    return (f"--bits {target:g}: no allocation vLLM serves meets it (one setting per fused "
            f"q/k/v and gate/up, every expert of a MoE layer one setting, experts int4/int8, "
            f"zero points at 4/8 bit only); the smallest servable target is "
            f"{math.ceil(smallest * 1000) / 1000:.3f} bpw; --engine none allows every measured "
            f"candidate (the export then may not load in vLLM)")


@dataclass(frozen=True)
class BpwRange:
    """The bits per weight (of the original model) a measurement can reach for an export."""

    least: float  # every group (tie) at its narrowest allowed candidate
    most: float  # every group (tie) at its widest
    engine: str


def bpw_range(store, symmetric: bool, shapes: dict[str, tuple[int, int]],
              original_shapes: dict[str, tuple[int, int]], engine: str) -> BpwRange:
    """What `store` can reach: the optimiser's own groups and ties (allocation_groups), so the
    number said before any work is the one choose_settings would say."""
    groups, ties, _ = allocation_groups(store, shapes, symmetric, engine)
    per_weights = original_weights(store, shapes, original_shapes)
    return BpwRange(min_bpw(groups, per_weights, ties), max_bpw(groups, per_weights, ties),
                    engine)


def check_target(span: BpwRange, target: float, path) -> None:
    """Refuse a bits target the measurement cannot reach, naming the one bound it misses."""
    if target < span.least * (1 - 1e-12):
        if span.engine == "vllm":
            raise InputError(_below_servable(target, span.least))
        raise InputError(f"--bits {target:g} is below the least measurement {path} can reach: "
                         f"{span.least:.4f} bpw (every group at its narrowest); choose --bits "
                         f"{math.ceil(span.least * 1000) / 1000:.3f} or more")
    if target > span.most * (1 + 1e-12):
        raise InputError(f"--bits {target:g} is above the most measurement {path} offers: "
                         f"{span.most:.4f} bpw (every group at its widest); choose --bits "
                         f"{math.floor(span.most * 1000) / 1000:.3f} or less")


def original_weights(store, shapes: dict[str, tuple[int, int]],
                     original_shapes: dict[str, tuple[int, int]]) -> float:
    """How many weights of the original model the measured groups quantize: each group's
    (padded) numel scaled by its linears' original / padded sizes."""
    total = 0.0
    for layer in store.layers:
        for g in layer["groups"].values():
            padded = sum(shapes[m][0] * shapes[m][1] for m in g["modules"])
            original = sum(original_shapes[m][0] * original_shapes[m][1] for m in g["modules"])
            total += g["numel"] * original / padded
    return total
