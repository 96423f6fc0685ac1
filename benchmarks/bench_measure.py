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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--scratch", default="/tmp/layerquant_measure")
    a = ap.parse_args()
    import torch
    from quantizer.synthetic import write_checkpoint
    model = Path(a.scratch) / f"{a.preset}-{a.layers}L"
    if not (model / "config.json").exists():
        write_checkpoint(model, preset=a.preset, num_hidden_layers=a.layers, dtype=torch.float16)
    runs = {"uniform": quantize(model, Path(a.scratch) / "u", "--dtype", a.dtype),
            "adaptive-4.25": quantize(model, Path(a.scratch) / "a", "--bits", "4.25",
                                      "--dtype", a.dtype)}
    rows = []
    for name, r in runs.items():
        if r["rc"]:
            rows.append(f"| {name} | failed: {r['stderr'][-300:]!r} |")
            continue
        rep = r["report"]
        q = [x["seconds"] for x in rep["layers"]]
        m = rep.get("extra", {}).get("measure_seconds", [])
        rows.append(f"| {name} | {statistics.median(m) if m else '-'} | {statistics.median(q):.2f} | "
                    f"{rep['seconds']:.1f} | {rep.get('extra', {}).get('bit_allocation', {}).get('achieved_bpw', '-')} |")
    Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1, default=str))
    print("| run | measure s/layer (median) | quantize s/layer (median) | total s | bpw |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
