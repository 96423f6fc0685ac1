"""The GPU benchmark harness (benchmarks/bench_speed.py), checked on CPU: one real end-to-end
run in --tiny mode, and its planning, summaries, time budget and timeouts on made-up inputs."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_speed  # noqa: E402
import bench_speed_report as report  # noqa: E402

GIB = 1 << 30


def _run_tiny(tmp_path, only: str, layers: int) -> dict:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speed.py"), "--tiny", "--only", only,
                           "--layers", str(layers), "--out", str(out), "--scratch", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tables"] in proc.stdout  # the table is printed last
    return doc


@pytest.mark.slow
def test_tiny_end_to_end_rtn(tmp_path):
    doc = _run_tiny(tmp_path, "rtn", layers=2)
    assert doc["setup"]["checkpoint-7b"]["status"] == "ok"
    assert doc["setup"]["calib-text"]["bytes"] > 1000
    [run] = doc["runs"]
    assert run["status"] == "ok", run.get("reason")
    assert (run["who"], run["method"], run["dtype"], run["layers"]) == ("ours", "rtn", "float32", 2)
    s = run["summary"]
    assert s["layers"] == 2 and len(s["layer_seconds"]) == 2
    assert s["s_per_layer_median"] == pytest.approx(sum(s["layer_seconds"]) / 2)
    assert s["s_per_layer_median_excl_layer0"] == pytest.approx(s["layer_seconds"][1])
    assert 0 < s["s_per_layer_median"] < s["total_s"] and s["overhead_s"] > 0
    assert s["peak_rss"] > 0 and s["peak_reserved"] is None  # CPU run: no CUDA peaks
    assert s["all_finite"] is True and 0 < s["max_output_error"] < 1
    assert {"load_s", "quantize_s", "write_s", "rest_s"} <= set(s["layer_means"])
    assert s["layer_means"]["rest_s"] >= 0
    assert "--calib-data" in run["cmd"] and "--dtype float32" in run["cmd"]
    assert "main-ours-rtn-float32-7b" in doc["tables"]


@pytest.mark.slow
def test_tiny_end_to_end_awq(tmp_path):
    doc = _run_tiny(tmp_path, "awq", layers=1)
    [run] = doc["runs"]
    assert run["status"] == "ok", run.get("reason")
    assert run["summary"]["all_finite"] and run["summary"]["layer_means"]["quantize_s"] > 0


def _layer(i, seconds, reserved, stats):
    return {"index": i, "seconds": seconds, "load_s": seconds * 0.1, "quantize_s": seconds * 0.8,
            "write_s": seconds * 0.1, "output_error": random.uniform(0.01, 0.1),
            "peak_bytes": {"allocated": reserved // 2, "reserved": reserved}, "stats": stats}


def test_summarize_ours_on_a_made_up_report():
    secs = [random.uniform(5, 9)] + [random.uniform(1, 3) for _ in range(4)]
    reserved = [random.randint(1, 7) * GIB for _ in secs]
    layers = [_layer(i, t, r, {"time_s": {"search": t / 2, "clip": t / 4}, "skipped": "v_proj"})
              for i, (t, r) in enumerate(zip(secs, reserved))]
    predicted = max(reserved) * 1.1
    rep = {"layers": layers, "seconds": sum(secs) + 12.5, "notes": ["n"],
           "extra": {"plan": {"predicted_peak": {"cuda:0": predicted}}}}
    s = report.summarize_ours(rep, budget_bytes=8 * GIB)
    assert s["s_per_layer_median"] == pytest.approx(sorted(secs)[2])
    assert s["s_per_layer_median_excl_layer0"] == pytest.approx(
        (sorted(secs[1:])[1] + sorted(secs[1:])[2]) / 2)
    assert s["e2e_s_per_layer"] == pytest.approx((sum(secs) + 12.5) / 5)
    assert s["overhead_s"] == pytest.approx(12.5)
    assert s["peak_reserved"] == max(reserved) and s["peak_allocated"] == max(reserved) // 2
    assert s["layer_means"]["time_s.search"] == pytest.approx(sum(secs) / 10)
    assert s["layer_means"]["rest_s"] == pytest.approx(0, abs=1e-9)  # load+quant+write = all
    assert "skipped" not in s["layer_means"]  # strings are not averaged
    assert s["predicted_peak"] == pytest.approx(predicted)
    assert s["pred_rel_error"] == pytest.approx(0.1) and s["pred_within_15pct"]
    assert s["within_budget"] is True
    layers[0]["stats"]["modules"] = {"q_proj": {"solve_s": 1.0}}
    row = {"id": "r1", "table": "main", "who": "ours", "method": "gptq", "dtype": "bfloat16",
           "model": "7b", "layers": 5, "budget": None, "status": "ok", "wall_s": 40.0,
           "summary": report.summarize_ours(rep)}
    table = report.format_tables([row])
    assert "time_s.search" in table and "modules.q_proj.solve_s" not in table  # JSON only
    assert "modules.q_proj.solve_s" in row["summary"]["layer_means"]
    # a NaN layer error and a busted budget are reported, not hidden
    layers[2]["output_error"] = math.nan
    s = report.summarize_ours({"layers": layers, "seconds": 99.0}, budget_bytes=max(reserved) - 1)
    assert s["all_finite"] is False and s["within_budget"] is False
    assert s["predicted_peak"] is None and "pred_rel_error" not in s


def _args(*extra):
    return bench_speed.parse_args(["--out", "unused.json", *extra])


def test_plan_selection_and_priorities():
    runs = bench_speed.plan_runs(_args("--only", "awq,gptq,peer", "--quick"))
    ids = [r.id for r in runs]
    assert ids[:2] == ["main-ours-awq-bfloat16-7b", "main-peer-awq-bfloat16-7b"]
    assert not any(r.table == "budget" for r in runs)
    assert not any(r.who == "peer" and r.dtype == "float16" for r in runs)  # --quick: bf16 only
    full = bench_speed.plan_runs(_args())
    assert full[-1].table == "budget" and full[-1].model == "7b"
    assert sum(r.id == "main-peer-awq-float16-7b" for r in full) == 1
    budget = bench_speed.plan_runs(_args("--only", "budget"))
    assert {r.table for r in budget} == {"budget"} and {r.who for r in budget} == {"ours"}
    assert {r.budget for r in budget} == {None, "8G", "16G", "40G"}
    assert {(r.model, r.layers) for r in budget} == {("70b", 2), ("7b", 4)}
    with pytest.raises(SystemExit):
        _args("--only", "awk")


def test_budget_runs_skip_without_the_flag_and_time_budget_skips(tmp_path):
    a = _args("--tiny", "--only", "budget", "--scratch", str(tmp_path),
              "--out", str(tmp_path / "r.json"), "--time-budget", "0.001")
    runs = bench_speed.plan_runs(a)
    bench = bench_speed.Bench(a)
    time.sleep(0.01)
    for spec in runs:
        bench.execute(spec, vram_flag=False)
    budgeted = [r for r in runs if r.budget]
    assert budgeted and all("--vram-budget" in r.result["reason"] for r in budgeted)
    unconstrained = [r for r in runs if not r.budget]
    assert unconstrained and all(r.result["status"] == "skipped" and "time budget" in
                                 r.result["reason"] for r in unconstrained)
    table = report.format_tables([bench_speed.record(r) for r in runs])
    assert "Not measured" in table and "no --vram-budget" in table


def test_run_process_kills_on_timeout(tmp_path):
    t0 = time.monotonic()
    res = bench_speed.run_process([sys.executable, "-c", "import time; print('x', flush=True); "
                                   "time.sleep(60)"], 1.0, tmp_path / "log.txt")
    assert res["timed_out"] and time.monotonic() - t0 < 20
    assert "timeout" in bench_speed.failure_reason(res)
    res = bench_speed.run_process([sys.executable, "-c", "import sys; sys.exit('boom')"], 30,
                                  tmp_path / "log2.txt")
    assert res["rc"] == 1 and "boom" in bench_speed.failure_reason(res)


def test_parse_report_skips_leading_noise():
    payload = {"layers": [], "seconds": random.random()}
    text = "warning: something\n" + json.dumps(payload, indent=2) + "\n"
    assert bench_speed.parse_report(text) == payload
    with pytest.raises(ValueError):
        bench_speed.parse_report("no json here")


def test_issue21_suite_plan():
    runs = bench_speed.plan_runs(_args("--suite", "issue21"))
    ids = [r.id for r in runs]
    assert ids[:4] == ["8L-ours-gptq-7b-8L", "8L-peer-gptq-7b-8L", "8L-ours-awq-7b-8L",
                       "8L-peer-awq-7b-8L"]
    assert ids[4:6] == ["32L-gptq-ours-gptq-7b-32L", "32L-gptq-peer-gptq-7b-32L"]
    assert {r.dtype for r in runs} == {"bfloat16"}
    assert {(r.model, r.layers) for r in runs if r.who != "probe"} == {
        ("7b", 8), ("7b", 32), ("qwen3moe", 2), ("mixtral", 2)}
    assert [r.id for r in runs if r.who == "probe"] == ["startup-probe"]
    picked = bench_speed.plan_runs(_args("--suite", "issue21", "--rows", "moe-awq,32L-awq",
                                         "--moe-layers", "3"))
    assert [r.id for r in picked] == ["moe-awq-ours-awq-qwen3moe-3L",
                                      "moe-awq-peer-awq-qwen3moe-3L",
                                      "32L-awq-ours-awq-7b-32L", "32L-awq-peer-awq-7b-32L"]
    tiny = bench_speed.plan_runs(_args("--suite", "issue21", "--tiny", "--rows", "8L"))
    assert {r.who for r in tiny} == {"ours"} and {r.layers for r in tiny} == {2}
    with pytest.raises(SystemExit):
        _args("--suite", "issue21", "--rows", "9L")


def _suite_run(who, method, layers, wall, secs=None, peer_per_layer=None, phases=None):
    run = {"id": f"8L-{who}-{method}", "table": "issue21", "who": who, "method": method,
           "dtype": "bfloat16", "model": "7b", "layers": layers, "budget": None,
           "status": "ok", "wall_s": wall}
    if who == "ours":
        total = wall - 3.0
        run["summary"] = report.summarize_ours({"layers": [
            _layer(i, t, GIB, {}) for i, t in enumerate(secs)], "seconds": total,
            "extra": {"phases_s": phases}})
    else:
        run["summary"] = report.summarize_peer({"layers": layers, "per_layer_s": peer_per_layer})
    return run


def test_issue21_tables_on_made_up_runs():
    secs = [2.0] + [0.5] * 7
    phases = {"plan": 2.5, "calibration_tokens": 0.1, "embed": 0.6, "export": 0.2}
    ours = _suite_run("ours", "gptq", 8, 12.0, secs, phases=phases)
    peer = _suite_run("peer", "gptq", 8, 30.0, peer_per_layer=1.9)
    text = report.format_tables([ours, peer])
    row = next(l for l in text.splitlines() if l.startswith("| Llama-2-7B width | 8 | GPTQ"))
    assert "| 0.50 | 1.90 | 3.80× | 12.0 s | 30.0 s | 2.50× | ok/ok |" in row
    f = report.fixed_cost(ours)
    assert f["fixed"] == pytest.approx(12.0 - 8 * 0.5)
    assert f["startup+exit"] == pytest.approx(3.0) and f["layer0 extra"] == pytest.approx(1.5)
    assert f["fixed"] == pytest.approx(sum(v for k, v in f.items() if k != "fixed"))
    assert "Our fixed cost" in text and "8L-ours-gptq" in text
    # a failed peer leaves the ratio empty, never a made-up number
    peer["status"] = "failed"
    row = next(l for l in report.format_tables([ours, peer]).splitlines()
               if l.startswith("| Llama-2-7B width"))
    assert "| - | 12.0 s |" in row and "ok/failed" in row


@pytest.mark.slow
def test_tiny_issue21_suite_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speed.py"), "--suite", "issue21",
                           "--tiny", "--rows", "8L,moe-gptq", "--out", str(out),
                           "--scratch", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["status"] for r in doc["runs"]] == ["ok", "ok", "ok"], doc["runs"]
    assert "Qwen3-30B-A3B width" in doc["tables"] and "Our fixed cost" in doc["tables"]


def test_peer_setup_runs_beside_set_up_never_beside_a_timed_run(tmp_path, monkeypatch):
    """The peer's wheel install and import check start in a thread with the first checkpoint
    build; every timed run (ours, the peer's, the probe) waits for them to finish."""
    import threading
    spans, lock = [], threading.Lock()

    def fake_run_process(cmd, timeout, log_path, env=None, cwd=None):
        text = " ".join(map(str, cmd))
        kind = ("install" if "pip" in text else "import" if "import datasets" in text
                else "build" if "write_checkpoint" in text else "timed")
        t0 = time.monotonic()
        time.sleep({"install": 0.3, "import": 0.3, "build": 0.4}.get(kind, 0.05))
        with lock:
            spans.append((kind, t0, time.monotonic(), threading.current_thread().name, text))
        return {"rc": 0, "timed_out": False, "wall_s": 0.1, "stdout": "", "stderr_tail": ""}

    monkeypatch.setattr(bench_speed, "run_process", fake_run_process)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "llmcompressor-0.14.0.1-py3-none-any.whl").write_bytes(b"")
    a = _args("--suite", "issue21", "--tiny", "--only", "peer", "--rows", "8L,startup",
              "--peer-wheels", str(wheels), "--scratch", str(tmp_path / "s"),
              "--out", str(tmp_path / "r.json"))
    runs = bench_speed.plan_runs(a)
    assert [r.who for r in runs] == ["ours", "peer", "ours", "peer", "probe"]
    bench = bench_speed.Bench(a)
    bench.run(runs)
    background = [s for s in spans if s[3] == "peer-setup"]
    assert [s[0] for s in background] == ["install", "import"]
    build = next(s for s in spans if s[0] == "build")
    assert background[0][1] < build[2]  # the install started while the checkpoint was built
    for kind, start, *_ in spans:
        if kind == "timed":
            assert all(b[2] <= start for b in background)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["setup"]["peer-install"]["background"] is True
    assert doc["setup"]["peer-import"]["status"] == "ok"
    assert "--no-index" in background[0][4] and str(wheels) in background[0][4]
    assert len([s for s in spans if s[0] == "timed"]) == 5
