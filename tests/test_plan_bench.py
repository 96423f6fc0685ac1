"""benchmarks/bench_budget.py's pure parts on made-up reports: which runs in which order, the
predicted-vs-measured summary, the injected-OOM identity check, the printed table."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_budget import (check_injection, format_budget_tables, parse_args,  # noqa: E402
                          plan_cases, summarize_budget)

GIB = 1 << 30


def test_cases_put_the_target_first_and_respect_only():
    cases = plan_cases(parse_args(["--out", "x.json"]))
    ids = [c["id"] for c in cases]
    assert ids[:4] == ["ours-70b-gptq-8G", "ours-70b-gptq-free", "ours-70b-awq-8G",
                       "ours-70b-awq-free"]
    assert ids[4:6] == ["ours-70b-gptq-free-inject1", "ours-70b-gptq-8G-inject1"]
    assert len([i for i in ids if i.startswith("ours-7b")]) == 8 and "peer" not in " ".join(ids)
    narrow = [c["id"] for c in plan_cases(parse_args(
        ["--out", "x.json", "--only", "7b,awq,16G,nofree,noinject,peer"]))]
    assert narrow == ["ours-7b-awq-16G"]
    peer = [c["id"] for c in plan_cases(parse_args(["--out", "x", "--only", "70b,gptq,peer"]))]
    assert "peer-70b-gptq-free" in peer


def report(pred, reserved_per_layer, context=500 << 20, retries=()):
    layers = [{"index": i, "seconds": 1.0 + i, "load_s": 0.1, "quantize_s": 0.5, "write_s": 0.1,
               "output_error": 0.01, "predicted_peak": pred,
               "peak_bytes": {"allocated": r - (100 << 20), "reserved": r,
                              "nvml_used": r + context},
               "decisions": {"hidden": "cpu", "chunk": 8}, "oom_retries": list(retries)[:1]
               if i == 1 else []} for i, r in enumerate(reserved_per_layer)]
    return {"layers": layers, "seconds": 10.0, "notes": [],
            "extra": {"plan": {"predicted_peak": {"cuda:0": pred}, "cuda_context": context,
                               "decisions": {"cuda:0": {"hidden": "cpu"}}}}}


def test_summary_compares_the_allocator_part_and_the_budget():
    reserved = [random.randint(5, 7) * GIB for _ in range(3)]
    context = 500 << 20
    pred = max(reserved) + context + GIB // 20  # 5 % over, allocator part
    s = summarize_budget(report(pred, reserved, context), 8 * GIB)
    assert s["predicted_allocator"] == pred - context
    assert s["pred_rel_error"] == pytest.approx((GIB / 20) / max(reserved))
    assert s["pred_within_15pct"] and s["within_budget"]
    assert s["nvml_used_max"] == max(reserved) + context and len(s["per_layer"]) == 3
    tight = summarize_budget(report(pred, reserved, context), max(reserved) + context - 1)
    assert tight["within_budget"] is False
    off = summarize_budget(report(2 * pred, reserved, context), None)
    assert not off["pred_within_15pct"] and "within_budget" not in off


def test_injection_identity_and_table():
    base = dict(who="ours", model="70b", method="gptq", budget="8G", status="ok")
    ref = dict(base, id="ours-70b-gptq-8G", inject=None, export_sha256="abc",
               summary=summarize_budget(report(6 * GIB, [5 * GIB] * 2), 8 * GIB))
    hit = dict(base, id="ours-70b-gptq-8G-inject1", inject="1", export_sha256="abc",
               summary=summarize_budget(report(6 * GIB, [5 * GIB] * 2, retries=["x"]),
                                        8 * GIB))
    other = dict(hit, id="other", export_sha256="def")
    cases = [ref, hit, other]
    check_injection(cases)
    assert hit["identical"] is True and hit["identical_to"] == ref["id"]
    assert other["identical"] is False
    table = format_budget_tables(cases + [dict(base, id="skipped-one", inject=None,
                                               status="skipped", reason="time budget")])
    assert "| ours-70b-gptq-8G | 6.00 | 5.51 | 5.00 |" in table
    assert "export identical to ours-70b-gptq-8G: yes" in table
    assert "export identical to ours-70b-gptq-8G: NO" in table
    assert "skipped-one: skipped: time budget" in table
