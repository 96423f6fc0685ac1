"""The planner's output for people: a plan as the table and breakdown `quantize plan` prints."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .memsize import format_size

if TYPE_CHECKING:
    from .plan import Plan


def _layer_span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _format_plan(plan: Plan) -> str:
    s = plan.shapes
    moe = (f" · {s.num_experts} experts × {s.moe_intermediate} (top-{s.experts_per_tok}"
           + (f", shared {s.shared_expert_intermediate}" if s.shared_expert_intermediate
              else "") + f") in {s.moe_layers} layers") if s.is_moe else ""
    calib = ("no calibration" if plan.method == "rtn" else
             f"calibration {plan.calib_samples} × {plan.calib_seqlen} tokens")
    lines = [f"plan for {s.model_type or 'model'}: {s.layers} layers · hidden {s.hidden} · "
             f"intermediate {s.intermediate} · heads {s.heads} (kv {s.kv_heads}) × "
             f"{s.head_dim}{moe}",
             f"method {plan.method} · {calib} · working dtype {plan.dtype_bytes} bytes", ""]
    header = ("device", "budget", "predicted peak", "layers", "hidden", "hessian", "mode",
              "chunk", "row slices", "experts/pass")
    rows = [header]
    for dp in plan.devices:
        d = dp.decisions
        rows.append((dp.device.label, format_size(dp.budget), format_size(dp.predicted_peak),
                     _layer_span(dp.layers), d.hidden, d.hessian, d.mode, str(d.chunk),
                     str(d.row_slices), str(d.experts_per_pass or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for dp in plan.devices:
        lines += ["", f"peak on {dp.device.label} during {dp.peak_phase}:"]
        width = max(len(k) for k, _ in dp.breakdown)
        lines += [f"  {k.ljust(width)}  {format_size(v):>10}" for k, v in dp.breakdown]
        lines.append(f"  {'total'.ljust(width)}  {format_size(dp.predicted_peak):>10}")
        if dp.steps:
            runs: list[list] = []
            for step in dp.steps:
                if runs and runs[-1][0] == step:
                    runs[-1][1] += 1
                else:
                    runs.append([step, 1])
            lines.append("  moves from the fastest configuration: " + ", ".join(
                f"{step} ×{n}" if n > 1 else step for step, n in runs))
    if plan.ram_breakdown:
        lines += ["", f"host RAM: {format_size(plan.ram_peak)} of "
                      f"{format_size(plan.ram_budget)}"]
        lines += [f"  {k}: {format_size(v)}" for k, v in plan.ram_breakdown]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
