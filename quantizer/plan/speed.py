"""The planner's speed model: seconds per decoder layer for GPTQ and AWQ, from the layer's
shapes, fitted to measured GPU runs.

    t(layer) = F / R  +  u * units  +  B / BW

F: the floating-point work of the method on this layer (`features`): the forwards over the
   calibration tokens (four passes for GPTQ: float, two capture passes on average,
   propagate; three for AWQ), GPTQ's Hessians (2·T_g·n² per input group, T_g the tokens that
   reach it) and solves (2n³ for the factor and inverse, 2·rows·n² for the column solve), AWQ's
   grid search (20 candidates, each a forward of the group's weights over its tokens).
units: solve / search units (every input group; each routed expert's groups count apart):
   the per-group launch, synchronisation and bookkeeping cost that dominates MoE layers.
B: the layer's weights in bytes of the working dtype (read, dequantized, packed, written).

R, u and BW are fitted per method by non-negative least squares on relative error to the
steady-state per-layer seconds (layer 0 left out) of the runs in MEASURED, every one on an
H200 with 128 × 512 calibration tokens, bf16, group 128, unconstrained memory;
`fit()` recomputes them from those files (tests/test_giants.py checks that it gives
COEFFICIENTS). An H100 ran the 7B-width GPTQ layer 6% slower (speed_h100_s6_32L.json:
0.93 s vs 0.88 s), within the model's error; placements a tight budget forces (Hessians on the
CPU, small chunks) cost more than the model says."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..demo.synthetic import PRESETS
from ..settings import AWQOptions
from .shapes import ModelShapes, layer_groups, resolve_arch

GRID = AWQOptions.grid  # AWQ's scale candidates per group (its default)
# The export's assembly (layer files read back, shards written): 32 llama2-7b layers, 3.6 GB
# of export in 3.5 s on the H100 box (speed_h100_s6_32L.json, phases_s.export).
ASSEMBLY_BYTES_PER_S = 1.0e9
FORWARD_PASSES = {"gptq": 4, "awq": 3}


@dataclass(frozen=True)
class Measured:
    """One measured per-layer time: a preset of quantizer/synthetic.py at real width."""

    preset: str
    moe: bool
    method: str
    seconds: float
    source: str  # benchmarks/results file
    case: str  # the run's id (or preset) in that file


MEASURED = (
    Measured("llama2-7b", False, "gptq", 0.877, "budget_h200_s4_gptq.json", "ours-7b-gptq-free"),
    Measured("llama2-70b", False, "gptq", 4.618, "budget_h200_70b_s5_gptq_4layers.json",
             "ours-70b-gptq-free"),
    Measured("mixtral-8x7b", True, "gptq", 5.189, "moe_h200x2_1gpu.json", "mixtral-8x7b"),
    Measured("qwen3-30b-a3b", True, "gptq", 5.404, "moe_h200x2_1gpu.json", "qwen3-30b-a3b"),
    Measured("llama2-7b", False, "awq", 2.680, "budget_h200_s4_awq.json", "ours-7b-awq-free"),
    Measured("llama2-70b", False, "awq", 8.872, "budget_h200_s4_awq.json", "ours-70b-awq-free"),
    Measured("mixtral-8x7b", True, "awq", 7.068, "moe_h200x2_1gpu.json", "mixtral-8x7b"),
    Measured("qwen3-30b-a3b", True, "awq", 27.935, "moe_h200x2_1gpu.json", "qwen3-30b-a3b"),
)

# (seconds per FLOP, seconds per unit, seconds per weight byte), from fit() on MEASURED.
COEFFICIENTS = {
    "gptq": (2.6659e-15, 1.3764e-02, 1.3677e-09),
    "awq": (3.1002e-15, 1.0457e-01, 5.1441e-10),
}
SOURCE = ("speed model fitted to H200 per-layer times (benchmarks/results: "
          "budget_h200_s4_*, budget_h200_70b_s5_gptq_4layers, moe_h200x2_1gpu; 7B/70B dense, "
          "Mixtral, Qwen3-30B-A3B; fit within 11%)")


def features(shapes: ModelShapes, method: str, moe: bool, tokens: int, arch=None,
             dtype_bytes: int = 2) -> tuple[float, float, float]:
    """(F, units, B) of one decoder layer (dense, or MoE when `moe`)."""
    groups = layer_groups(shapes, moe, resolve_arch(shapes, arch))
    experts = max(shapes.num_experts, 1)
    top_k = shapes.experts_per_tok or 1
    active = units = hessian = solve = search = weights = 0.0
    for g in groups:
        per_copy = g.weight_elements(1)
        weights += g.weight_elements()
        routed = g.copies > 1
        seen = tokens * top_k / experts if routed else tokens  # tokens reaching one copy
        active += top_k * per_copy if routed else per_copy
        n = g.in_features
        rows = sum(lin.out_features for lin in g.linears)
        units += g.copies
        hessian += g.copies * 2 * seen * n * n
        solve += g.copies * (2 * n ** 3 + 2 * rows * n * n)
        search += g.copies * GRID * 2 * seen * per_copy
    forward = 2 * tokens * active * FORWARD_PASSES[method]
    flops = forward + (hessian + solve if method == "gptq" else search)
    return flops, units, weights * dtype_bytes


def layer_seconds(shapes: ModelShapes, method: str, moe: bool, tokens: int, arch=None,
                  dtype_bytes: int = 2) -> float:
    f = features(shapes, method, moe, tokens, arch, dtype_bytes)
    return sum(c * x for c, x in zip(COEFFICIENTS[method], f))


def model_seconds(shapes: ModelShapes, method: str, tokens: int, arch=None,
                  dtype_bytes: int = 2, export_bytes: int = 0) -> dict[str, float]:
    """Per layer kind ('dense', 'moe') seconds per layer, 'assembly' for writing an export of
    `export_bytes`, and 'total'."""
    out = {}
    dense = shapes.layers - shapes.moe_layers
    total = 0.0
    for moe, count in ((False, dense), (True, shapes.moe_layers)):
        if count:
            t = layer_seconds(shapes, method, moe, tokens, arch, dtype_bytes)
            out["moe" if moe else "dense"] = t
            total += count * t
    out["assembly"] = export_bytes / ASSEMBLY_BYTES_PER_S
    out["total"] = total + out["assembly"]
    return out


# ------------------------------------------------------------------------------- the fit


def measured_seconds(m: Measured, results: Path) -> float:
    """The steady-state seconds per layer of `m` read from its results file."""
    data = json.loads((results / m.source).read_text())
    for run in data.get("runs", []) + data.get("cases", []):
        if run.get("id") == m.case and run.get("method") == m.method:
            return float(run["summary"]["s_per_layer_median_excl_layer0"])
        if run.get("preset") == m.case and run.get("method") == m.method:
            return float(run["s_per_layer"][-1])  # two layers: the second is steady state
    raise KeyError(f"{m.case} ({m.method}) not in {m.source}")


def fit(results: Path | None = None) -> dict[str, tuple[float, float, float]]:
    """Non-negative least squares (every subset of the three terms, the best feasible one) on
    relative error, per method; with `results`, the seconds are read from the files."""
    out: dict[str, tuple[float, float, float]] = {}
    for method in ("gptq", "awq"):
        rows, times = [], []
        for m in (x for x in MEASURED if x.method == method):
            cfg = dict(PRESETS[m.preset])
            shapes = ModelShapes.from_config(cfg)
            rows.append(features(shapes, method, m.moe, 128 * 512))
            times.append(measured_seconds(m, results) if results else m.seconds)
        a = np.array(rows) / np.array(times)[:, None]
        y = np.ones(len(times))
        best: tuple[float, np.ndarray] | None = None
        for r in range(1, 4):
            for cols in itertools.combinations(range(3), r):
                x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
                if (x < 0).any():
                    continue
                full = np.zeros(3)
                full[list(cols)] = x
                err = float(np.sum((a @ full - y) ** 2))
                if best is None or err < best[0]:
                    best = (err, full)
        assert best is not None  # the one-term fits are never all negative
        c0, c1, c2 = (float(v) for v in best[1])
        out[method] = (c0, c1, c2)
    return out


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
