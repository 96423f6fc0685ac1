"""The planner's output for people: a plan as the table and breakdown `quantize plan` prints,
with the memory plan per layer kind, host RAM, disk and the time the speed model predicts."""
from __future__ import annotations

from typing import Sequence

from .memory import device_peak, disk_needs, export_sizes, layer_elements, ram_peak
from .sizes import format_size
from .speed import SOURCE, format_duration, model_seconds


def _layer_span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def format_plan(plan) -> str:
    """The plan as `quantize plan` prints it (plan: planner.Plan)."""
    s = plan.shapes
    moe = (f" · {s.num_experts} experts × {s.moe_intermediate} (top-{s.experts_per_tok}"
           + (f", shared {s.shared_expert_intermediate}" if s.shared_expert_intermediate
              else "") + f") in {s.moe_layers} layers") if s.is_moe else ""
    calib = ("no calibration" if plan.method == "rtn" and plan.calib_samples < 1 else
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
    lines += _table(rows)
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
                      f"{format_size(plan.ram_budget)}"
                  + (f" (peak while it does {plan.ram_phase})" if plan.ram_phase else "")]
        lines += [f"  {k}: {format_size(v)}" for k, v in plan.ram_breakdown]
    if plan.host is not None:
        lines += [""] + _details(plan)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _details(plan) -> list[str]:
    """Per layer kind: weights, GPU peak, host RAM, time per layer; then disk and time."""
    dp = plan.devices[0]
    job = plan.job(dp)
    s = plan.shapes
    tokens = plan.calib_samples * plan.calib_seqlen
    export = export_sizes(job)[1]
    times = {m: model_seconds(s, m, tokens, plan.arch, plan.dtype_bytes, export)
             for m in ("gptq", "awq")}
    where = "host" if dp.device.is_host else dp.device.label
    rows = [("layer kind", "layers", "weights", f"peak on {where}", "during",
             "host RAM", "during", "gptq s/layer", "awq s/layer")]
    for groups, extra in job.kinds:
        moe = any(g.copies > 1 for g in groups)
        kind = "moe" if moe else "dense"
        count = s.moe_layers if moe else s.layers - s.moe_layers
        peak = device_peak(job, dp.decisions, kinds=[(groups, extra)], assemble=False)
        if dp.device.is_host:
            ram, ram_phase = peak.total, peak.phase
        else:
            ram, ram_phase, _ = ram_peak(job, dp.decisions, kinds=[(groups, extra)],
                                          assemble=False)
        rows.append((kind, str(count), _count(layer_elements(groups, extra)),
                     format_size(peak.total), peak.phase, format_size(ram),
                     ram_phase, f"{times['gptq'].get(kind, 0):.1f}",
                     f"{times['awq'].get(kind, 0):.1f}"))
    h = plan.host
    out = ["memory plan per layer kind (" + (f"original weights read as {h.stored_label}, "
                                              if h.stored_label else "")
           + f"{h.stored_per_weight:.2f} bytes/weight on disk; export "
           f"{h.export_per_weight:.3f} bytes/weight):"]
    out += ["  " + line for line in _table(rows)]
    disk, items = disk_needs(job, dp.decisions)
    out += ["", f"disk beside the checkpoint: {format_size(disk)} at the peak"]
    out += [f"  {k}: {format_size(v)}" for k, v in items]
    if dp.device.is_host:
        return out + ["", "time: the speed model covers GPU runs only"]
    out += ["", f"time on one GPU ({SOURCE}):"]
    for m in ("gptq", "awq"):
        t = times[m]
        parts = [f"{kind} {t[kind]:.1f} s/layer" for kind in ("dense", "moe") if kind in t]
        out.append(f"  {m}: {format_duration(t['total'])} for {s.layers} layers ("
                   + ", ".join(parts) + f"; writing the export {format_duration(t['assembly'])}"
                   + ")")
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"
