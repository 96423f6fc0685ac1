"""The parts of a quantize run's fixed cost, each measured alone in a fresh process.

    python benchmarks/startup_probe.py MODEL_DIR [--device cuda]

Prints one JSON object (seconds of wall time per probe): Python alone, import torch, CUDA
initialisation, import transformers + the model's modeling code, import layerquant's CLI and
API, the GPU warm-up (quantizer/run/warmup.py) after those imports versus on its thread beside
them, and the GPTQ Triton kernel's build with an empty cache versus a filled one
(~/.cache/layerquant/triton keeps it between runs). benchmarks/bench_speed.py runs it as the
suite row "startup"."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(code: str, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=REPO, timeout=300)
    out = {"wall_s": round(time.perf_counter() - t0, 3)}
    if res.returncode:
        out["error"] = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
    elif res.stdout.strip():
        out["inner"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    model_type = json.loads((Path(a.model) / "config.json").read_text())["model_type"]
    modeling = f"transformers.models.{model_type}.modeling_{model_type}"
    dev = ("torch.device('cuda' if torch.cuda.is_available() else 'cpu')"
           if a.device == "auto" else f"torch.device({a.device!r})")
    probes = {
        "python": "pass",
        "import torch": "import torch",
        "cuda init": f"import torch; d = {dev}; torch.zeros(1, device=d); "
                     "d.type == 'cuda' and torch.cuda.synchronize(d)",
        "import transformers + modeling": f"import torch, transformers; "
                                          f"from transformers import AutoConfig; import {modeling}",
        "import layerquant cli + api": "import quantizer.cli, quantizer.api",
        "imports, then warm-up": (
            "import json, time, torch; t = time.perf_counter(); "
            f"import transformers, {modeling}; from quantizer.run import warmup; "
            f"d = {dev}; t1 = time.perf_counter(); "
            "d.type == 'cuda' and warmup._warm(d); "
            "print(json.dumps({'imports_s': t1 - t, 'warm_s': time.perf_counter() - t1}))"),
        "warm-up beside imports": (
            "import json, time, torch; t = time.perf_counter(); from quantizer.run import warmup; "
            f"d = {dev}; warmup.start(d); import transformers, {modeling}; "
            "t1 = time.perf_counter(); w = warmup.wait(); "
            "print(json.dumps({'imports_s': t1 - t, 'total_s': time.perf_counter() - t, "
            "'warm_thread_s': w, 'error': warmup._STATE['error']}))"),
    }
    out = {"model_type": model_type}
    for name, code in probes.items():
        out[name] = timed(code)
    with tempfile.TemporaryDirectory() as cache:
        kernel = ("import json, time, torch; from quantizer.run.warmup import _warm_gptq_kernel; "
                  f"d = {dev}; t = time.perf_counter(); "
                  "d.type == 'cuda' and _warm_gptq_kernel(d); "
                  "d.type == 'cuda' and torch.cuda.synchronize(d); "
                  "print(json.dumps({'kernel_s': time.perf_counter() - t}))")
        out["gptq kernel, empty cache"] = timed(kernel, {"TRITON_CACHE_DIR": cache})
        out["gptq kernel, cached"] = timed(kernel, {"TRITON_CACHE_DIR": cache})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
