"""Summaries of one benchmark run (ours: the `quantize --json` report; the peer: its JSON line)
and the markdown tables that benchmarks/bench_speed.py prints and stores. Pure functions of
dicts, so the CPU tests can check them on made-up reports."""
from __future__ import annotations

import math
import statistics

GIB = 1 << 30
PRED_TOLERANCE = 0.15  # issue 6: prediction within 15 % of the measured peak

# ---------------------------------------------------------------------------- summaries
def _mean_numeric(dicts: list[dict]) -> dict:
    keys = sorted({k for d in dicts for k, v in d.items() if _is_number(v)})
    return {k: statistics.fmean(d[k] for d in dicts if _is_number(d.get(k))) for k in keys}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rest(layer: dict):
    """Layer time outside load/quantize/write: the fp forward (reference outputs), the forward
    of the quantized layer (output error, next layer's inputs) and bookkeeping."""
    parts = [layer.get(k) for k in ("seconds", "load_s", "quantize_s", "write_s")]
    return parts[0] - sum(parts[1:]) if all(_is_number(v) for v in parts) else None


# Our fixed costs outside the peer harness's clock (see peer_llmcompressor.py): its model load,
# its tokenization, and no export written.
PEER_UNTIMED = ("plan", "calibration_tokens", "export")


def summarize_ours(report: dict, budget_bytes: int | None = None) -> dict:
    """Seconds per layer (median, and median without layer 0, which pays warm-up costs such as
    kernel compilation), peaks, per-stage means and predicted vs measured peak."""
    layers = report["layers"]
    secs = [l["seconds"] for l in layers]
    phases = (report.get("extra") or {}).get("phases_s") or {}
    peaks = [l.get("peak_bytes") or {} for l in layers]

    def peak(key):
        vals = [p[key] for p in peaks if _is_number(p.get(key))]
        return max(vals) if vals else None

    per_layer = [{"load_s": l.get("load_s"), "quantize_s": l.get("quantize_s"),
                  "write_s": l.get("write_s"), "rest_s": _rest(l),
                  **_flatten(l.get("stats") or {})} for l in layers]
    stages = _mean_numeric(per_layer)
    errors = [l.get("output_error") for l in layers if l.get("output_error") is not None]
    s = {"layers": len(layers), "s_per_layer_median": statistics.median(secs),
         "s_per_layer_median_excl_layer0": statistics.median(secs[1:]) if len(secs) > 1 else None,
         "s_per_layer_mean": statistics.fmean(secs), "layer_seconds": secs,
         "total_s": report.get("seconds"),
         "e2e_s_per_layer": report["seconds"] / len(layers) if report.get("seconds") else None,
         "overhead_s": report["seconds"] - sum(secs) if report.get("seconds") else None,
         "phases_s": phases,
         # the span the peer's harness times: it reads config and weights, tokenizes the
         # calibration set before its clock starts, and never writes an export
         "peer_span_s_per_layer": ((report["seconds"] - sum(phases.get(k, 0.0) for k in
                                                            PEER_UNTIMED)) / len(layers)
                                   if report.get("seconds") and phases else None),
         "peak_reserved": peak("reserved"), "peak_allocated": peak("allocated"),
         "peak_rss": peak("rss"), "layer_means": stages,
         # steady state: layer 0 pays once-per-run costs (kernel compiles, pinning buffers)
         "layer_means_excl_layer0": (_mean_numeric(per_layer[1:]) if len(layers) > 1
                                     else None),
         "max_output_error": max(errors) if errors else None,
         "all_finite": all(math.isfinite(e) for e in errors) if errors else None,
         "notes": report.get("notes", [])}
    plan = (report.get("extra") or {}).get("plan") or {}
    predicted = plan.get("predicted_peak")
    if isinstance(predicted, dict):
        vals = [v for v in predicted.values() if _is_number(v)]
        predicted = max(vals) if vals else None
    s["predicted_peak"] = predicted if _is_number(predicted) else None
    measured = s["peak_reserved"] if s["peak_reserved"] is not None else s["peak_rss"]
    if s["predicted_peak"] is not None and measured:
        # torch's reserved never includes the CUDA context the plan adds to its peak
        context = (plan.get("cuda_context") or 0) if s["peak_reserved"] is not None else 0
        s["pred_rel_error"] = abs(s["predicted_peak"] - context - measured) / measured
        s["pred_within_15pct"] = s["pred_rel_error"] <= PRED_TOLERANCE
    if budget_bytes is not None and s["peak_reserved"] is not None:
        s["within_budget"] = s["peak_reserved"] <= budget_bytes
    return s


def summarize_peer(res: dict) -> dict:
    gib = lambda v: v * GIB if _is_number(v) else None  # noqa: E731
    return {"layers": res.get("layers"), "e2e_s_per_layer": res.get("per_layer_s"),
            "quantize_s": res.get("quantize_s"), "load_s": res.get("load_s"),
            "peak_allocated": gib(res.get("peak_alloc_gib")),
            "peak_reserved": gib(res.get("peak_reserved_gib")), "device": res.get("device"),
            "quantized_modules": res.get("quantized_modules")}


def fixed_cost(run: dict) -> dict | None:
    """Our run's fixed cost (process wall - layers × median s/layer) and its parts: process
    start-up and exit (imports, interpreter; wall - the run's own seconds), the phases the
    report times (plan: config + transformers import + memory plan; calibration tokens; embed:
    skeleton, embeddings, the export's layout; export: the last files and the rename), layer
    0's extra time over the median (first-use kernel builds, library loads) and the rest (job
    directory, fingerprints, the last layer's write)."""
    s = run.get("summary") or {}
    wall, total, median = run.get("wall_s"), s.get("total_s"), s.get("s_per_layer_median")
    secs = s.get("layer_seconds") or []
    if not all(_is_number(v) for v in (wall, total, median)) or not secs:
        return None
    phases = s.get("phases_s") or {}
    parts = {"startup+exit": wall - total,
             **{k: phases.get(k, 0.0) for k in ("plan", "calibration_tokens", "embed",
                                                 "export")},
             "layer0 extra": max(0.0, secs[0] - median)}
    fixed = wall - len(secs) * median
    parts["other"] = fixed - sum(parts.values())
    return {"fixed": fixed, **parts}


def _peer_of(run: dict, runs: list[dict]) -> dict | None:
    for r in runs:
        if (r["who"], r["table"], r["model"], r["layers"], r["method"], r["dtype"]) == \
                ("peer", run["table"], run["model"], run["layers"], run["method"], run["dtype"]):
            return r
    return None


_MODEL_NAMES = {"7b": "Llama-2-7B width", "70b": "Llama-2-70B width",
                "qwen3moe": "Qwen3-30B-A3B width", "mixtral": "Mixtral-8x7B width"}


def issue_tables(runs: list[dict]) -> list[str]:
    """Issue 21's table: per model, layers and method, our median s/layer beside
    llm-compressor's (its oneshot time / layers), the ratio, both processes' wall time; then
    our fixed cost broken down, and the start-up probe."""
    ours = [r for r in runs if r["table"] == "issue21" and r["who"] == "ours"]
    if not ours:
        return []
    out = ["", "Issue 21 (same process sequence on one GPU; ours: median of per-layer times; "
           "llm-compressor 0.14: oneshot time / layers, model load excluded; wall: the whole "
           "process, imports and model load included)"]
    rows = []
    for r in ours:
        s, p = r.get("summary") or {}, _peer_of(r, runs)
        ps = (p or {}).get("summary") or {}
        ok = r["status"] == "ok" and p is not None and p["status"] == "ok"
        ratio = (ps["e2e_s_per_layer"] / s["s_per_layer_median"]
                 if ok and _is_number(ps.get("e2e_s_per_layer")) else None)
        wall_ratio = (p["wall_s"] / r["wall_s"] if ok and _is_number(r.get("wall_s"))
                      else None)
        rows.append((_MODEL_NAMES.get(r["model"], r["model"]), r["layers"], r["method"].upper(),
                     _num(s.get("s_per_layer_median")), _num(ps.get("e2e_s_per_layer")),
                     _num(ratio) + ("×" if ratio else ""),
                     _num(r.get("wall_s"), ".1f") + (" s" if r.get("wall_s") else ""),
                     _num((p or {}).get("wall_s"), ".1f") + (" s" if p and p.get("wall_s")
                                                             else ""),
                     _num(wall_ratio) + ("×" if wall_ratio else ""),
                     r["status"] if p is None else f"{r['status']}/{p['status']}"))
    out += _table(["model", "layers", "method", "ours s/layer (median)",
                   "llm-compressor 0.14 s/layer", "ratio", "ours process wall",
                   "llm-compressor process wall", "wall ratio", "status"], rows)
    fixed = [(r, fixed_cost(r)) for r in ours if r["status"] == "ok"]
    fixed = [(r, f) for r, f in fixed if f]
    if fixed:
        keys = ["startup+exit", "plan", "calibration_tokens", "embed", "layer0 extra",
                "export", "other"]
        out += ["", "Our fixed cost (process wall - layers × median s/layer), seconds"]
        out += _table(["run", "fixed", *keys],
                      [(r["id"], _num(f["fixed"], ".1f"), *(_num(f[k], ".1f") for k in keys))
                       for r, f in fixed])
    probe = next((r for r in runs if r["who"] == "probe" and r["status"] == "ok"), None)
    if probe:
        s = probe["summary"]
        out += ["", "Start-up probe (fresh processes, wall seconds)"]
        out += _table(["probe", "wall s", "inside"],
                      [(k, _num(v.get("wall_s")), json_short(v.get("inner") or v.get("error")))
                       for k, v in s.items() if isinstance(v, dict)])
    return out


def json_short(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_num(x) if _is_number(x) else x}" for k, x in v.items())
    return str(v)[:80]


# ---------------------------------------------------------------------------- tables
def _gib(v) -> str:
    return f"{v / GIB:.2f}" if _is_number(v) else "-"


def _num(v, fmt: str = ".2f") -> str:
    return format(v, fmt) if _is_number(v) else "-"


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _table(headers, rows) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _label(r: dict) -> str:
    return f"{r['model'].upper()}-width {r['layers']}L"


def format_tables(runs: list[dict]) -> str:
    """Markdown tables: main comparison, our per-stage breakdown, the budget table, failures."""
    out: list[str] = issue_tables(runs)
    main = [r for r in runs if r["table"] == "main"]
    if main:
        out += ["", "Speed (s/layer: median of per-layer times; 'w/o L0' leaves out layer 0's "
                "warm-up; e2e = whole run / layers, the peer's definition; process s = wall "
                "time of the process incl. imports and model load)"]
        out += _table(["model", "method", "dtype", "tool", "s/layer", "w/o L0", "e2e s/layer",
                       "process s", "peak alloc GiB", "peak resv GiB", "pred GiB", "finite",
                       "status"],
                      [(_label(r), r["method"], r["dtype"], r["who"],
                        _num(s.get("s_per_layer_median")),
                        _num(s.get("s_per_layer_median_excl_layer0")),
                        _num(s.get("e2e_s_per_layer")), _num(r.get("wall_s"), ".0f"),
                        _gib(s.get("peak_allocated")),
                        _gib(s.get("peak_reserved")), _gib(s.get("predicted_peak")),
                        _yes(s.get("all_finite")), r["status"])
                       for r in main for s in [r.get("summary") or {}]])
        ours = {(r["method"], r["dtype"]): r for r in main if r["who"] == "ours"}
        for r in main:
            o = ours.get((r["method"], r["dtype"]))
            if r["who"] == "peer" and r["status"] == "ok" and o and o["status"] == "ok":
                ratio = r["summary"]["e2e_s_per_layer"] / o["summary"]["e2e_s_per_layer"]
                line = (f"{r['method']} {r['dtype']} {_label(r)}: llm-compressor e2e / ours "
                        f"e2e = {ratio:.2f}x")
                span = o["summary"].get("peer_span_s_per_layer")
                if span:
                    line += (f"; on the span the peer times (ours without "
                             f"{' + '.join(PEER_UNTIMED)}: {span:.2f} s/layer) = "
                             f"{r['summary']['e2e_s_per_layer'] / span:.2f}x")
                out.append(line)
    ok = [r for r in runs if r["who"] == "ours" and r["status"] == "ok"]
    if ok:
        keys = sorted({k for r in ok for k in r["summary"]["layer_means"] if _stage_key(k)})
        first = ["load_s", "quantize_s", "write_s", "rest_s"]
        keys = first + [k for k in keys if k not in first]
        out += ["", "Our per-stage seconds, mean over layers (time_s.*, hessian_s, solve_s nest "
                "inside quantize_s; rest_s = layer time outside load/quantize/write: the fp and "
                "quantized forwards; setup = run total - layer sum, of which plan (config, "
                "imports), calibration tokens, embed (skeleton, embeddings), export (final "
                "write))"]
        phase_keys = ["plan", "calibration_tokens", "embed", "export"]
        out += _table(["run", *keys, "setup", *phase_keys],
                      [(r["id"], *(_num(r["summary"]["layer_means"].get(k)) for k in keys),
                        _num(r["summary"].get("overhead_s"), ".1f"),
                        *(_num((r["summary"].get("phases_s") or {}).get(k), ".1f")
                          for k in phase_keys)) for r in ok])
    budget = [r for r in runs if r["table"] == "budget" and r["budget"] and
              r["status"] != "skipped"]
    if budget:
        out += ["", "VRAM budget (measured = max torch reserved over layers)"]
        out += _table(["model", "method", "dtype", "budget", "pred GiB", "meas GiB", "alloc GiB",
                       "s/layer", "<= budget", "pred within 15%", "x unconstrained", "status"],
                      [(_label(r), r["method"], r["dtype"], r["budget"],
                        _gib(s.get("predicted_peak")), _gib(s.get("peak_reserved")),
                        _gib(s.get("peak_allocated")), _num(s.get("s_per_layer_median")),
                        _yes(s.get("within_budget")), _yes(s.get("pred_within_15pct")),
                        _num(_slowdown(r, runs)), r["status"])
                       for r in budget for s in [r.get("summary") or {}]])
        refs = [r for r in runs if r["table"] == "budget" and not r["budget"]]
        if refs:
            out += ["", "Unconstrained references and the peer on the budget models"]
            out += _table(["model", "method", "dtype", "tool", "s/layer", "e2e s/layer",
                           "peak alloc GiB", "peak resv GiB", "status"],
                          [(_label(r), r["method"], r["dtype"], r["who"],
                            _num(s.get("s_per_layer_median")), _num(s.get("e2e_s_per_layer")),
                            _gib(s.get("peak_allocated")), _gib(s.get("peak_reserved")),
                            r["status"]) for r in refs for s in [r.get("summary") or {}]])
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        out += ["", "Not measured"]
        out += _table(["run", "status", "reason"],
                      [(r["id"], r["status"], (r.get("reason") or "").replace("|", "/")[:160])
                       for r in bad])
    return "\n".join(out)


def _stage_key(key: str) -> bool:
    """Layer-level timings (`hessian_s`, `time_s.search`); per-module ones stay in the JSON."""
    parts = key.split(".")
    return (len(parts) == 1 and key.endswith("_s")) or (len(parts) == 2 and parts[0] == "time_s")


def _slowdown(r: dict, runs: list[dict]):
    """Budgeted s/layer over the unconstrained run's (same model, method, dtype)."""
    for ref in runs:
        if (ref["who"], ref["model"], ref["method"], ref["dtype"]) == \
                ("ours", r["model"], r["method"], r["dtype"]) and not ref["budget"] \
                and ref["status"] == "ok" and r["status"] == "ok":
            return r["summary"]["s_per_layer_median"] / ref["summary"]["s_per_layer_median"]
    return None
