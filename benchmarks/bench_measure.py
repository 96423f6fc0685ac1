"""Cost of adaptive GPTQ's measurement pass per layer, next to a uniform GPTQ pass, on a
generated checkpoint (GPU box: no hub). Writes JSON and prints a table.

    python benchmarks/bench_measure.py --out results.json [--preset llama2-7b] [--layers 2]"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def quantize(model, out, *extra):
    cmd = [sys.executable, "-m", "quantizer.cli", str(model), "-o", str(out), "--method", "gptq",
           "--calib-samples", "128", "--calib-seqlen", "512", "--json", "--no-progress",
           "--overwrite", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"cmd": cmd, "rc": p.returncode, "stderr": p.stderr[-3000:]}
    report = json.loads(p.stdout[p.stdout.index("{"):])
    return {"cmd": cmd, "rc": 0, "process_s": time.perf_counter() - t0, "report": report}


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--scratch", default="/tmp/layerquant_measure")
    a = ap.parse_args()
    import torch
    from quantizer.demo.synthetic import write_checkpoint
    model = Path(a.scratch) / f"{a.preset}-{a.layers}L"
    if not (model / "config.json").exists():
        write_checkpoint(model, preset=a.preset, num_hidden_layers=a.layers, dtype=torch.float16)
    runs = {"uniform": quantize(model, Path(a.scratch) / "u", "--dtype", a.dtype),
            "adaptive-4.25": quantize(model, Path(a.scratch) / "a", "--bits", "4.25",
                                      "--dtype", a.dtype)}
    Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1, default=str))
    print(table(runs))


def steady(values):
    """Median over layers >= 1 (layer 0 pays kernel compiles), or all when there is one."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def table(runs: dict) -> str:
    """Measurement s/layer and its parts beside a uniform GPTQ pass's s/layer, and the ratio:
    how many uniform quantizations of a layer one measurement of it costs."""
    bad = [f"{name}: failed: {r['stderr'][-300:]!r}" for name, r in runs.items() if r["rc"]]
    if bad:
        return "\n".join(bad)
    uni = runs["uniform"]["report"]
    ada = runs["adaptive-4.25"]["report"]
    q = steady([x["seconds"] for x in uni["layers"]])
    m = steady(ada["extra"]["measure_seconds"])
    stats = ada["extra"].get("measure_stats") or []
    parts = {k: steady([st.get(k, 0.0) for st in stats]) for k in
             ("measure_hessian_s", "measure_solve_s", "measure_block_s", "measure_solves")} \
        if stats else {}
    rows = ["| layers | uniform GPTQ s/layer | measure s/layer | of which Hessians | solves "
            "(count) | block judging | measure / uniform | adaptive quantize s/layer | bpw |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {len(uni['layers'])} | {q:.2f} | {m:.2f} | "
            f"{parts.get('measure_hessian_s', float('nan')):.2f} | "
            f"{parts.get('measure_solve_s', float('nan')):.2f} "
            f"({parts.get('measure_solves', 0):.0f}) | "
            f"{parts.get('measure_block_s', float('nan')):.2f} | {m / q:.1f}x | "
            f"{steady([x['seconds'] for x in ada['layers']]):.2f} | "
            f"{ada['extra'].get('bit_allocation', {}).get('achieved_bpw', float('nan')):.3f} |"]
    return "\n".join(rows) + ("\n(steady state: medians over layers >= 1; one measurement "
                               "serves every later target)")


if __name__ == "__main__":
    main()
