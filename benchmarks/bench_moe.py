"""MoE quantization cost on one GPU: wall time per layer and peak GPU memory of AWQ and GPTQ
on generated real-width MoE checkpoints cut to a few layers (GPU box: no hub, so checkpoints
are written here, random N(0, 0.02) fp16, per-expert tensors as real checkpoints store them).

    python benchmarks/bench_moe.py --out results.json [--time-budget 540] [--quick] [--gpus 1,2]

Default cases: mixtral-8x7b width (hidden 4096, 8 experts of 14336, top-2) and qwen3-30b-a3b
width (hidden 2048, 128 experts of 768, top-8), 2 layers each, AWQ and GPTQ, 4-bit g128,
128 x 512 calibration tokens (built-in prose), bf16. Every case runs in its own process
(`python -m quantizer.cli ... --json`), is recorded whatever happens (exit code, timeout), and
the JSON is rewritten after each case; a case whose estimate no longer fits the time budget
is skipped, not started. `--gpus 1,2`: each case on one GPU, then spread over two (one
process per GPU, `--devices 0,1`; experts and calibration shards split over them; the export
must hash the same). `--quick`: tiny-mixtral and tiny-qwen3-moe on the CPU, 4 x 32
tokens, float32 (a smoke test of this script, not a measurement)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_budget import export_hash  # noqa: E402  (the same sha256 of the export's files)
FULL = dict(presets=("mixtral-8x7b", "qwen3-30b-a3b"), layers=2, samples=128, seqlen=512,
            dtype="bfloat16", group_size="128", device="auto")
QUICK = dict(presets=("tiny-mixtral", "tiny-qwen3-moe"), layers=2, samples=4, seqlen=32,
             dtype="float32", group_size="32", device="cpu")


def write_model(scratch: Path, preset: str, layers: int) -> tuple[Path, float]:
    """The generated checkpoint (reused while the scratch folder survives)."""
    import torch

    from quantizer.demo.synthetic import write_checkpoint

    path = scratch / f"{preset}-{layers}L"
    if (path / "config.json").exists():
        return path, 0.0
    t0 = time.perf_counter()
    write_checkpoint(path, preset=preset, num_hidden_layers=layers, dtype=torch.float16)
    return path, time.perf_counter() - t0


def devices_arg(cfg: dict, gpus: int) -> list[str]:
    if gpus <= 1:
        return ["--device", cfg["device"]]
    if cfg["device"] == "cpu":  # --quick: the same code path with gloo processes
        return ["--devices", ",".join(["cpu"] * gpus)]
    return ["--devices", ",".join(str(i) for i in range(gpus))]


def run_case(model: Path, out: Path, method: str, cfg: dict, timeout: float,
             gpus: int = 1) -> dict:
    cmd = [sys.executable, "-m", "quantizer.cli", str(model), "-o", str(out), "--method",
           method, "--bits", "4", "--group-size", cfg["group_size"], "--calib-samples",
           str(cfg["samples"]), "--calib-seqlen", str(cfg["seqlen"]), "--dtype", cfg["dtype"],
           *devices_arg(cfg, gpus), "--json", "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout),
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as e:
        return {"cmd": cmd, "ok": False, "error": f"timeout after {timeout:.0f} s",
                "stderr": (e.stderr or b"")[-2000:].decode(errors="replace")
                if isinstance(e.stderr, bytes) else str(e.stderr)[-2000:]}
    wall = time.perf_counter() - t0
    if p.returncode:
        return {"cmd": cmd, "ok": False, "error": f"exit {p.returncode}", "wall_s": wall,
                "stderr": p.stderr[-3000:]}
    try:
        report = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError as e:
        return {"cmd": cmd, "ok": False, "error": f"no JSON report ({e})", "wall_s": wall,
                "stdout": p.stdout[-2000:], "stderr": p.stderr[-2000:]}
    return {"cmd": cmd, "ok": True, "wall_s": wall, **summarise(report),
            "export_hash": export_hash(out), "log_tail": p.stderr[-1500:]}


def summarise(report: dict) -> dict:
    layers = report["layers"]
    secs = [r["seconds"] for r in layers]
    peaks = [r.get("peak_bytes") or {} for r in layers]

    def peak(key):
        vals = [p[key] for p in peaks if p.get(key) is not None]
        return max(vals) if vals else None

    coverage = report.get("expert_coverage", {})
    return {"layers": len(layers), "s_per_layer": secs,
            "median_s_per_layer": statistics.median(secs) if secs else None,
            "quantize_s_per_layer": [r["quantize_s"] for r in layers],
            "load_s_per_layer": [r["load_s"] for r in layers],
            "write_s_per_layer": [r["write_s"] for r in layers],
            "peak_allocated": peak("allocated"), "peak_reserved": peak("reserved"),
            "peak_rss": peak("rss"), "run_s": report.get("seconds"),
            "output_error": [r["output_error"] for r in layers],
            "experts_rtn_fallback": {k: v["fallback_rtn"] for k, v in coverage.items()},
            "expert_tokens_min": {k: min(v["tokens"]) for k, v in coverage.items()},
            "predicted_peak": (report.get("extra", {}).get("plan") or {}).get("predicted_peak"),
            "notes": report.get("notes", [])}


def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def table(results: dict) -> str:
    head = ("model", "method", "GPUs", "ok, same bytes as 1 GPU", "s/layer (median)", "s/layer", "peak alloc GiB",
            "peak reserved GiB", "peak RSS GiB", "out err", "RTN fallback", "export hash")
    rows = [head]
    for r in results["cases"]:
        if not r.get("ok"):
            rows.append((r["preset"], r["method"], r.get("gpus", 1), "NO",
                         r.get("error", r.get("skipped", "")), "", "", "", "", "", "", ""))
            continue
        rows.append((r["preset"], r["method"], r.get("gpus", 1), r.get("same_as_1gpu", "yes"),
                     f"{r['median_s_per_layer']:.2f}",
                     " ".join(f"{s:.2f}" for s in r["s_per_layer"]), gib(r["peak_allocated"]),
                     gib(r["peak_reserved"]), gib(r["peak_rss"]),
                     " ".join(f"{e:.4f}" for e in r["output_error"] if e is not None),
                     str(sum(len(v) for v in r["experts_rtn_fallback"].values())),
                     (r.get("export_hash") or "")[:16]))
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   cuda=torch.cuda.is_available(),
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception as e:  # the results still say what failed
        env["error"] = repr(e)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every case)")
    ap.add_argument("--scratch", default="/tmp/layerquant_moe_bench")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds for everything")
    ap.add_argument("--quick", action="store_true", help="tiny models on the CPU (smoke test)")
    ap.add_argument("--methods", default="awq,gptq")
    ap.add_argument("--presets", default=None, help="comma list (default: see --quick)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--gpus", default="1", help="comma list of GPU counts per case, e.g. 1,2")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = dict(QUICK if a.quick else FULL)
    if a.presets:
        cfg["presets"] = tuple(a.presets.split(","))
    if a.layers:
        cfg["layers"] = a.layers
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"command": [sys.executable, *sys.argv], "config": cfg,
               "environment": environment(), "cases": []}

    def save():
        results["elapsed_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(results, indent=2, default=str))

    last_case_s = 0.0
    gpu_counts = [int(n) for n in a.gpus.split(",")]
    for preset, method, gpus in ((p, m, n) for p in cfg["presets"]
                                 for m in a.methods.split(",") for n in gpu_counts):
        case = {"preset": preset, "method": method, "layers": cfg["layers"], "gpus": gpus}
        left = a.time_budget - (time.perf_counter() - t_start)
        # the previous case's time is the estimate for this one (same widths or smaller)
        if left < max(30.0, 0.8 * last_case_s):
            case.update(ok=False, skipped=f"time budget: {left:.0f} s left")
        else:
            try:
                model, write_s = write_model(scratch, preset, cfg["layers"])
                case["checkpoint_write_s"] = write_s
                left = a.time_budget - (time.perf_counter() - t_start)
                case.update(run_case(model, scratch / f"out-{preset}-{method}-{gpus}",
                                     method, cfg, left, gpus))
                last_case_s = case.get("wall_s", last_case_s)
                one = next((c for c in results["cases"] if c["preset"] == preset and
                            c["method"] == method and c["gpus"] == 1 and c.get("ok")), None)
                if gpus > 1 and one and case.get("ok"):
                    same = case["export_hash"] == one["export_hash"]
                    case["same_as_1gpu"] = "yes" if same else "NO"
                    case["speedup_vs_1gpu"] = (one["median_s_per_layer"]
                                               / case["median_s_per_layer"])
            except Exception as e:  # recorded, never fatal: the next case still runs
                case.update(ok=False, error=f"{type(e).__name__}: {e}")
        results["cases"].append(case)
        save()
        print(f"[{time.perf_counter() - t_start:.0f}s] {preset} {method} x{gpus}: "
              f"{'ok' if case.get('ok') else case.get('error') or case.get('skipped')}",
              flush=True)
    print(table(results))
    save()
    return 0 if all(c.get("ok") for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
