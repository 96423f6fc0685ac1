"""Multi-GPU evidence (issue #8): device correctness and data/module-parallel scaling.

    python benchmarks/bench_multi_gpu.py --out $OUT/multi_gpu.json [--time-budget 480]
        [--only correctness,scaling] [--methods gptq,awq] [--gpus 1,2,4] [--quick]

(a) correctness, needs 2 GPUs (current device stays cuda:0 throughout):
    quantlinear-cuda1   QuantLinear (AWQ and GPTQ layouts, fp16) on cuda:1 gives the cuda:0
                        output bit for bit; an input on the other GPU raises a clear error
    quantize-cuda1      tiny model, GPTQ and AWQ, --device cuda:1: files identical to cuda:0
    eval-placement      ppl/KL with every layer on cuda:1, and mixed cuda:0/cuda:1, == cuda:0
    nccl-2proc          tiny model, 2 processes (NCCL): files identical to one process
(b) scaling: Llama-2-7B-width preset cut to 4 layers, 128 x 512 calibration tokens, GPTQ and
    AWQ on 1, 2 (and 4 when visible) GPUs, each `python -m quantizer.cli ... --devices 0,1`
    in its own process: wall seconds (process), e2e and per-layer seconds, speedup against
    1 GPU, and whether the output files equal the 1-GPU run's (sha256 of the safetensors).

--quick: tiny model, 16 x 32 calibration, CPU processes (gloo) instead of GPUs: proves the
script end to end on a machine without GPUs. Every case is its own try/except, the JSON is
rewritten after each, and a case whose estimate no longer fits --time-budget is skipped."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _importable() -> None:
    """Run from a plain copy of the repository (the GPU box): `kernels`, `calibration`,
    `measurements` are importable only as quantizer.* (pyproject maps them; links do the same
    without installing), and the repository goes on sys.path (spawned workers inherit it)."""
    for pkg in ("kernels", "calibration", "measurements"):
        link = REPO / "quantizer" / pkg
        if not link.exists():
            link.symlink_to(Path("..") / pkg)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


_importable()
# rough seconds per scaling run on an H100/H200 (start-up + 4 layers), for the budget guard
ESTIMATE_S = {"gptq": 45, "awq": 70}


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"args": vars(args), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime()),
                     "cases": [], "scaling": []}

    def left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    def save(self) -> None:
        self.out.write_text(json.dumps(self.data, indent=2, default=str))

    def case(self, name: str, fn, estimate: float = 30) -> None:
        rec = {"case": name}
        if self.left() < estimate:
            rec.update(status="skipped", reason=f"{self.left():.0f} s left < {estimate} s")
        else:
            t = time.time()
            try:
                rec.update(fn() or {})
                rec.setdefault("status", "ok")
            except Exception as e:  # one broken case must not hide the others
                rec.update(status="error", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-3000:])
            rec["seconds"] = round(time.time() - t, 2)
        print(f"[multi-gpu] {name}: {rec['status']} {rec.get('error', '')}", flush=True)
        self.data["cases"].append(rec)
        self.save()


# ---- (a) correctness -------------------------------------------------------------------------
def _keep_current(d0: str) -> None:
    """The current CUDA device stays d0's (cuda:0) throughout: work on d1 must not need it."""
    import torch
    if d0.startswith("cuda"):
        torch.cuda.set_device(torch.device(d0))


def _current_kept(d0: str) -> None:
    import torch
    if d0.startswith("cuda"):
        assert torch.cuda.current_device() == torch.device(d0).index, "the current device moved"


def quantlinear_cuda1(d0: str = "cuda:0", d1: str = "cuda:1"):
    import torch
    from quantizer.kernels.packing import QuantizedWeight
    from quantizer.kernels.quant_linear import QuantLinear

    _keep_current(d0)
    gen = torch.Generator().manual_seed(int(time.time()))
    K, N, gs = 512, 256, 128
    q = QuantizedWeight(codes=torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8),
                        scales=torch.rand(N, K // gs, generator=gen) * 0.01 + 1e-3,
                        zeros=torch.randint(1, 15, (N, K // gs), generator=gen,
                                            dtype=torch.int32),
                        bits=4, group_size=gs)
    out = {}
    for layout in ("awq", "gptq"):
        for m in (1, 7, 64, 300):
            x = torch.randn(m, K, generator=gen).half()
            ys = []
            for dev in (d0, d1):
                mod = QuantLinear.from_quantized(q, layout=layout).to(dev)
                ys.append(mod(x.to(dev)))
                assert ys[-1].device == torch.device(dev), (ys[-1].device, dev)
                _current_kept(d0)
            same = torch.equal(ys[0].cpu(), ys[1].cpu())
            out[f"{layout}-M{m}"] = same
            assert same, f"{layout} M={m}: {d1} output differs from {d0}"
        if d0 != d1:
            try:
                mod(x.to(d0))  # module on d1, input on d0
                raise AssertionError("a mixed-device input did not raise")
            except ValueError as e:
                out[f"{layout}-mixed-error"] = str(e)
    return {"results": out}


def _tiny(scratch: Path) -> Path:
    from quantizer.demo.synthetic import write_checkpoint
    path = scratch / "tiny-llama"
    if not (path / "config.json").exists():
        write_checkpoint(path, preset="tiny-llama", num_hidden_layers=4)
    return path


def _tiny_jobs(model: Path, root: Path, tag: str, device: str | None):
    """(fn, args) per method: the settings object each process of a launch gets."""
    from quantizer.api import _quantize_worker
    from quantizer.settings import OutputSettings, QuantSettings
    common = dict(calib_samples=32, calib_seqlen=64, group_size=32)
    if device:
        common["device"] = device
    return [(_quantize_worker, (model, QuantSettings().replaced(method=m, **common),
                                OutputSettings(root / f"{tag}-{m}", overwrite=True), False, None))
            for m in ("gptq", "awq")]


def same_files(a: Path, b: Path) -> dict:
    names = sorted(p.name for p in Path(a).iterdir())
    if names != sorted(p.name for p in Path(b).iterdir()):
        return {"same": False, "why": "different file names"}
    # layerquant.json holds the run's notes, which name its devices and memory plan
    diff = [n for n in names if n != NOTES and _sha(Path(a) / n) != _sha(Path(b) / n)]
    return {"same": not diff, "differing": diff}


NOTES = "layerquant.json"


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def quantize_cuda1(scratch: Path, d0: str = "cuda:0", d1: str = "cuda:1"):
    from quantizer.parallel import distributed as D

    _keep_current(d0)
    model = _tiny(scratch)
    D.run_sequence(_tiny_jobs(model, scratch, "dev0", d0))
    D.run_sequence(_tiny_jobs(model, scratch, "dev1", d1))
    res = {m: same_files(scratch / f"dev0-{m}", scratch / f"dev1-{m}") for m in ("gptq", "awq")}
    _current_kept(d0)
    assert all(r["same"] for r in res.values()), res
    return {"results": res}


def eval_placement(scratch: Path, d0: str = "cuda:0", d1: str = "cuda:1"):
    from quantizer.validate.evaluation import evaluate

    _keep_current(d0)
    out = scratch / "dev0-gptq"
    if not out.exists():
        quantize_cuda1(scratch, d0, d1)
    kw = dict(data="builtin-eval", seqlen=64, max_windows=8, progress=False)
    ref = evaluate(out, device=d0, **kw)
    res = {d0: [ref.quant_ppl, ref.kl]}
    for placement in ([d1], [d0, d1], [d1, d0]):
        got = evaluate(out, devices=placement, **kw)
        res["+".join(placement)] = [got.quant_ppl, got.kl]
        assert (got.quant_ppl, got.kl) == (ref.quant_ppl, ref.kl), res
    _current_kept(d0)
    return {"results": res}


def nccl_2proc(scratch: Path, devices: list[str], ref_device: str):
    from quantizer.parallel import distributed as D

    model = _tiny(scratch)
    if not (scratch / "ref-gptq").exists():
        D.run_sequence(_tiny_jobs(model, scratch, "ref", ref_device))
    D.launch(devices, D.run_sequence, _tiny_jobs(model, scratch, "multi", None))
    res = {m: same_files(scratch / f"ref-{m}", scratch / f"multi-{m}") for m in ("gptq", "awq")}
    assert all(r["same"] for r in res.values()), res
    return {"results": res, "devices": devices}


# ---- (b) scaling -----------------------------------------------------------------------------
def make_model(scratch: Path, quick: bool) -> Path:
    code = ("import sys, torch; from quantizer.demo.synthetic import write_checkpoint; "
            "write_checkpoint(sys.argv[1], preset=sys.argv[2], num_hidden_layers=4)")
    path = scratch / ("tiny4" if quick else "llama2-7b-4L")
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-c", code, str(path),
                        "tiny-llama" if quick else "llama2-7b"], check=True, env=_env())
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def scaling_run(model: Path, scratch: Path, method: str, devices: str, quick: bool,
                timeout: float) -> dict:
    out = scratch / f"out-{method}-{devices.replace(',', '_')}"
    samples, seqlen = (16, 32) if quick else (128, 512)
    cmd = [sys.executable, "-m", "quantizer.cli", str(model), "-o", str(out), "--method", method,
           "--bits", "4", "--group-size", "32" if quick else "128", "--calib-samples",
           str(samples), "--calib-seqlen", str(seqlen), "--json", "--no-progress",
           "--overwrite"]
    cmd += ["--device", "cpu"] if devices == "cpu" else ["--devices", devices]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    wall = time.time() - t
    rec = {"method": method, "devices": devices, "processes": len(devices.split(",")),
           "wall_s": round(wall, 2), "returncode": proc.returncode, "output": str(out)}
    if proc.returncode != 0:
        rec.update(status="error", stderr=proc.stderr[-3000:])
        return rec
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    layers = [r["seconds"] for r in result["layers"]]
    rec.update(status="ok", run_s=round(result["seconds"], 2),
               s_per_layer=round(statistics.median(layers), 3),
               s_per_layer_wo_l0=round(statistics.median(layers[1:] or layers), 3),
               layer_sum_s=round(sum(layers), 2),
               quantize_s=round(sum(r["quantize_s"] for r in result["layers"]), 2),
               extra_processes=result.get("extra", {}).get("processes", 1),
               stages=stage_means(result["layers"]))
    return rec


# where a layer's time goes (rank 0's view): GPTQ hessian/solve, AWQ calibrate/search/clip
STAGE_KEYS = ("load_s", "quantize_s", "write_s", "hessian_s", "solve_s", "time_s.calibrate",
              "time_s.search", "time_s.clip", "time_s.quantize")


def stage_means(layers: list[dict]) -> dict:
    out = {}
    for key in STAGE_KEYS:
        vals = [r.get(key, r.get("stats", {}).get(key)) for r in layers]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            out[key] = round(sum(vals) / len(vals), 3)
    return out


def scaling(bench: Bench, scratch: Path) -> None:
    args = bench.args
    quick = args.quick
    model = make_model(scratch, quick)
    if quick:
        counts = [n for n in args.gpus if n <= 2]
        dev_of = {1: "cpu", 2: "cpu,cpu"}
    else:
        import torch
        visible = torch.cuda.device_count()
        counts = [n for n in args.gpus if n <= visible]
        dev_of = {n: ",".join(str(i) for i in range(n)) for n in counts}
    for method in args.methods:
        base = None
        for n in counts:
            est = 20 if quick else ESTIMATE_S[method] + 10 * n
            if bench.left() < est:
                rec = {"method": method, "devices": dev_of[n], "status": "skipped",
                       "reason": f"{bench.left():.0f} s left < estimate {est} s"}
            else:
                try:
                    rec = scaling_run(model, scratch, method, dev_of[n], quick,
                                      max(30.0, bench.left()))
                except Exception as e:
                    rec = {"method": method, "devices": dev_of[n], "status": "error",
                           "error": f"{type(e).__name__}: {e}"}
            if rec.get("status") == "ok":
                if base is None:
                    base = rec
                else:
                    rec["speedup_wall"] = round(base["wall_s"] / rec["wall_s"], 2)
                    rec["speedup_layers"] = round(base["layer_sum_s"] / rec["layer_sum_s"], 2)
                    rec["same_as_1"] = same_files(base["output"], rec["output"])
            print(f"[multi-gpu] scaling {method} x{n}: {rec.get('status')} "
                  f"{rec.get('wall_s', '')} {rec.get('error', rec.get('stderr', ''))[-300:]}",
                  flush=True)
            bench.data["scaling"].append(rec)
            bench.save()


def table(data: dict) -> str:
    lines = ["| case | status | detail |", "|---|---|---|"]
    for c in data["cases"]:
        lines.append(f"| {c['case']} | {c['status']} | "
                     f"{c.get('error', c.get('reason', json.dumps(c.get('results', ''))))[:160]} |")
    lines += ["", "| method | devices | wall s | run s | layers s | s/layer | w/o L0 | "
              "speedup (wall) | speedup (layers) | identical to 1 | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["scaling"]:
        same = r.get("same_as_1", {}).get("same", "-") if "same_as_1" in r else "-"
        lines.append(f"| {r['method']} | {r['devices']} | {r.get('wall_s', '-')} | "
                     f"{r.get('run_s', '-')} | {r.get('layer_sum_s', '-')} | "
                     f"{r.get('s_per_layer', '-')} | {r.get('s_per_layer_wo_l0', '-')} | "
                     f"{r.get('speedup_wall', '-')} | {r.get('speedup_layers', '-')} | {same} | "
                     f"{r.get('status')} |")
    lines += ["", "Mean seconds per layer by stage (rank 0):", ""]
    for r in data["scaling"]:
        if r.get("stages"):
            lines.append(f"- {r['method']} x{r.get('processes', '?')}: " + ", ".join(
                f"{k} {v}" for k, v in r["stages"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multi_gpu.json"))
    p.add_argument("--time-budget", type=float, default=480)
    p.add_argument("--only", default="correctness,scaling")
    p.add_argument("--methods", default="gptq,awq")
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--scratch", default=None, help="checkpoints and outputs (default: a "
                   "fresh folder under /tmp)")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU processes (gloo)")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.gpus = [int(n) for n in args.gpus.split(",")]
    parts = set(args.only.split(","))
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="layerquant_multi_gpu_"))
    scratch.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    if "correctness" in parts:
        if args.quick:  # the same code paths with both "devices" on the host
            bench.case("quantlinear-cpu", lambda: quantlinear_cuda1("cpu", "cpu"))
            bench.case("quantize-cpu", lambda: quantize_cuda1(scratch / "c", "cpu", "cpu"))
            bench.case("eval-placement-cpu", lambda: eval_placement(scratch / "c", "cpu", "cpu"))
            bench.case("gloo-2proc", lambda: nccl_2proc(scratch / "c", ["cpu", "cpu"], "cpu"))
        else:
            import torch
            if torch.cuda.device_count() < 2:
                bench.case("cuda1", lambda: {"status": "skipped", "reason": "needs 2 GPUs"})
            else:
                bench.case("quantlinear-cuda1", quantlinear_cuda1, 20)
                bench.case("quantize-cuda1", lambda: quantize_cuda1(scratch / "c"), 40)
                bench.case("eval-placement", lambda: eval_placement(scratch / "c"), 30)
                bench.case("nccl-2proc", lambda: nccl_2proc(scratch / "c", ["cuda:0", "cuda:1"],
                                                            "cuda:0"), 60)
    if "scaling" in parts:
        try:
            scaling(bench, scratch / "s")
        except Exception as e:
            bench.data["scaling_error"] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc(), flush=True)
    bench.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bench.save()
    print(table(bench.data))
    print(f"[multi-gpu] results: {bench.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
