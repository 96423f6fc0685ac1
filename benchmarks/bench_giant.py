"""A 671B-class model on one GPU and a small host: a DeepSeek-V3-width checkpoint in its FP8
layout (the three dense layers and MoE layers with all 256 routed experts + the shared expert,
MLA attention, the published widths; float8 e4m3 weights with 128x128 `weight_scale_inv`,
sharded safetensors) generated on the GPU, then quantized to 4 bits with GPTQ and AWQ under
--vram-budget / --ram-budget (80G / 64G, and smaller). Per layer: seconds, peak GPU memory
(allocator and the driver's count), the host's high-water RSS (and the whole process's, from
the kernel); the plan's prediction beside each; one MoE layer of the export read back with
`quantizer.validate.loader` (what `quantizer.load()` does) and compared with the FP8 original
dequantized; and the full model's ETA extrapolated from the measured layers.

    python benchmarks/bench_giant.py --out results.json [--scratch /tmp/giant]
        [--runs gptq:80G:64G,awq:80G:64G,gptq:48G:32G] [--time-budget 500] [--moe 2]
    python benchmarks/bench_giant.py --tiny --out r.json     # CPU smoke test (tiny widths)

The vocabulary is cut to --vocab (32768) so that the box's 64 GB disk holds the checkpoint
(~23 GB), one run's layer files and its export at once; embeddings and head are not
quantized and do not enter the per-layer numbers (the planner's host-RAM terms for them are
printed with the published vocabulary by `quantize plan tests/data/configs/deepseek-v3.json`).
Every run is its own `python -m quantizer.cli ... --json` process; the JSON is rewritten after
each step, and a run whose estimate no longer fits --time-budget is skipped, not started."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_giant.py` from a checkout
    sys.path.append(str(ROOT))
CONFIG = ROOT / "tests" / "data" / "configs" / "deepseek-v3.json"
GIB = 1 << 30
FULL_DENSE, FULL_MOE = 3, 58  # DeepSeek-V3: 61 layers, the first 3 dense
TINY = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, rope_scaling=None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_config(args):
    """transformers' DeepseekV3Config of the published config.json, cut to the benchmark."""
    from transformers import AutoConfig

    cfg = json.loads(CONFIG.read_text())
    cfg.pop("quantization_config", None)
    for key in ("architectures", "transformers_version", "auto_map"):
        cfg.pop(key, None)
    cfg.update(num_hidden_layers=args.dense + args.moe, first_k_dense_replace=args.dense,
               vocab_size=args.vocab, num_nextn_predict_layers=0, max_position_embeddings=4096)
    if args.tiny:
        cfg.update(TINY)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def generate(args, scratch: Path) -> tuple[Path, dict]:
    """The FP8 checkpoint, written from the GPU (reused while the scratch folder lives)."""
    import torch

    from quantizer.demo.synthetic_originals import write_generated

    path = scratch / f"deepseek-v3-fp8-{args.dense}d{args.moe}m{'-tiny' if args.tiny else ''}"
    if (path / "config.json").is_file():
        return path, {"status": "reused", "path": str(path)}
    shutil.rmtree(path, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    t0 = time.perf_counter()
    write_generated(path, model_config(args), "fp8-block", device=device,
                    max_shard_bytes=(5 * GIB if not args.tiny else 1 << 20))
    files = list(path.glob("*.safetensors"))
    return path, {"status": "ok", "path": str(path), "device": device,
                  "seconds": time.perf_counter() - t0, "shards": len(files),
                  "bytes": sum(f.stat().st_size for f in files)}


# ---------------------------------------------------------------------------- one run


class RssSampler(threading.Thread):
    """The child's resident set size every 0.2 s (psutil), its maximum and the series."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil
        try:
            proc = psutil.Process(self.pid)
            t0 = time.perf_counter()
            while not self.stop.is_set():
                rss = proc.memory_info().rss
                self.peak = max(self.peak, rss)
                self.samples.append((round(time.perf_counter() - t0, 1), rss))
                self.stop.wait(0.2)
        except psutil.Error:
            pass


def quantize_cmd(args, src: Path, out: Path, method: str, vram: str, ram: str,
                 work_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "quantizer.cli", str(src), "-o", str(out), "--method", method,
           "--bits", "4", "--group-size", "128" if not args.tiny else "32",
           "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen),
           "--json", "--no-progress", "--overwrite", "--ram-budget", ram,
           "--max-shard-size", "2G", "--min-expert-tokens", "1"]
    if work_dir is not None:
        cmd += ["--work-dir", str(work_dir)]
    if args.tiny:
        cmd += ["--device", "cpu", "--calib-data", "builtin"]
    else:
        cmd += ["--vram-budget", vram, "--dtype", "bfloat16"]
    return cmd


def run_case(args, src: Path, scratch: Path, method: str, vram: str, ram: str,
             timeout: float, work_dir: Path | None = None) -> dict:
    out = scratch / f"out-{method}-{vram}-{ram}"
    cmd = quantize_cmd(args, src, out, method, vram, ram, work_dir)
    case = {"method": method, "vram_budget": vram, "ram_budget": ram,
            "cmd": " ".join(cmd), "status": "started"}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    sampler = RssSampler(proc.pid)
    sampler.start()
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        stdout = proc.communicate(timeout=timeout)[0]
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout = proc.communicate()[0]
        status = "timeout"
    sampler.stop.set()
    reader.join(5)
    case.update(status=status, wall_s=time.perf_counter() - t0,
                peak_rss_sampled=sampler.peak, stderr_tail="".join(err_lines)[-3000:])
    if proc.returncode == 0:
        case.update(summarize(json.loads(stdout)))
        case["export_check"] = check_export(args, src, out)
    job = work_dir or out.with_name(out.name + ".job")
    if proc.returncode != 0:  # the layers it finished, from their files in the job directory
        case.update(summarize({"layers": finished_layers(job)}))
    shutil.rmtree(out, ignore_errors=True)  # the disk holds one export at a time
    shutil.rmtree(job, ignore_errors=True)
    return case


def finished_layers(job: Path) -> list[dict]:
    """The layer records a killed run left in its job directory (each layer's record file,
    or each layer file's header for a job written with layer files)."""
    from quantizer.measurements.atomic import read_safetensors_metadata

    records = []
    for path in sorted((job / "layers").glob("quantize-*.json")):  # direct shards' records
        try:
            records.append(json.loads(path.read_text())["meta"]["record"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for path in sorted((job / "layers").glob("quantize-*.safetensors")):  # layer files
        for value in read_safetensors_metadata(path).values():
            try:
                info = json.loads(value)
            except ValueError:
                continue
            if isinstance(info, dict) and "record" in info.get("meta", {}):
                records.append(info["meta"]["record"])
    return records


def summarize(report: dict) -> dict:
    """Per layer: kind, seconds, GPU peaks, RSS high-water mark, predicted peak, decisions."""
    layers = []
    for r in report["layers"]:
        peak = r.get("peak_bytes") or {}
        moe = any(k.startswith("expert_tokens.") for k in r.get("stats", {}))
        layers.append({"index": r["index"], "kind": "moe" if moe else "dense",
                       "seconds": r["seconds"], "load_s": r.get("load_s"),
                       "quantize_s": r.get("quantize_s"), "write_s": r.get("write_s"),
                       "allocated": peak.get("allocated"), "reserved": peak.get("reserved"),
                       "nvml_process": peak.get("nvml_process"), "rss": peak.get("rss"),
                       "predicted": r.get("predicted_peak"), "decisions": r.get("decisions"),
                       "output_error": r.get("output_error"),
                       "oom_retries": r.get("oom_retries")})
    extra = report.get("extra", {})
    plan = extra.get("plan", {})
    return {"layers": layers, "seconds": report.get("seconds"), "phases_s": extra.get("phases_s"),
            "plan_predicted": plan.get("predicted_peak"), "plan_ram": plan.get("ram_peak"),
            "plan_text": plan.get("text"), "notes": report.get("notes")}


CHECK = r"""
import json, sys, torch
from quantizer.validate.loader import LayerLoader
from quantizer.stream.skeleton import (build_skeleton, capture_layer0_inputs, load_layer,
                                layer_output, to_device)
from quantizer.stream.source import CheckpointSource
out, src, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
import quantizer.kernels.quant_linear as ql
ql._TRITON_STATE[:] = [False]  # dequantize + matmul: a check of the export, not the kernel
loader = LayerLoader(out, dtype, dev)
q = loader.load(index)
quantized = sum(1 for m in q.modules() if type(m).__name__ == "QuantLinear")
ids = torch.randint(0, loader.model.config.vocab_size, (2, 64))
_, kw = capture_layer0_inputs(loader.model, ids[:1])
kw = to_device(kw, dev, dtype)
x = torch.randn(2, 64, loader.model.config.hidden_size, generator=torch.Generator().manual_seed(0)
                ).to(dev, dtype)
with torch.no_grad():
    got = layer_output(q(x, **kw)).float()
loader.release(index)
source = CheckpointSource(src, originals=True)
model = build_skeleton(source, "cpu", dtype)
ref_layer = load_layer(model, source, index, dev, dtype)
with torch.no_grad():
    want = layer_output(ref_layer(x, **kw)).float()
err = float((got - want).norm() / want.norm())
print(json.dumps({"layer": index, "quantized_linears": quantized, "rel_error": err}))
"""


def check_export(args, src: Path, out: Path) -> dict:
    """Read one MoE layer of the export back (the loader behind quantizer.load()) and run it
    beside the FP8 original's layer dequantized: relative output error on random inputs."""
    index = args.dense  # the first MoE layer
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHECK, str(out), str(src), str(index)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"status": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(status="ok", seconds=time.perf_counter() - t0)
    return res


# ------------------------------------------------------------------------------ ETA


def layer_elements(args) -> dict[str, int]:
    """Weights of one dense and one MoE layer of the benchmark's config (the planner's
    shapes), which scale the export's assembly time to the full model."""
    from quantizer.plan.memory import layer_elements as elements_of
    from quantizer.plan.shapes import ModelShapes, layer_groups

    cfg = model_config(args).to_dict()
    shapes = ModelShapes.from_config(cfg)
    return {kind: elements_of(layer_groups(shapes, kind == "moe"), 0)
            for kind in ("dense", "moe")}


def eta(case: dict, elements: dict[str, int], dense: int = FULL_DENSE,
        moe: int = FULL_MOE) -> dict:
    """The full model's time from the measured layers: the median dense layer after the
    first (which pays for warm-up), the median MoE layer, and the fixed phases; the export's
    assembly scaled by the full model's layer weights against this run's."""
    layers = case.get("layers") or []
    all_dense = [x["seconds"] for x in layers if x["kind"] == "dense"]
    dense_s = all_dense[1:] or all_dense
    moe_s = [x["seconds"] for x in layers if x["kind"] == "moe"]
    if not moe_s or not dense_s:
        return {}
    d, m = statistics.median(dense_s), statistics.median(moe_s)
    phases = case.get("phases_s") or {}
    fixed = sum(v for k, v in phases.items() if k != "export")
    here = len(all_dense) * elements["dense"] + len(moe_s) * elements["moe"]
    full = dense * elements["dense"] + moe * elements["moe"]
    export = phases.get("export", 0.0) * full / max(1, here)
    total = dense * d + moe * m + fixed + export
    return {"dense_s": d, "moe_s": m, "fixed_s": fixed, "export_s": export,
            "layers_s": dense * d + moe * m, "total_s": total, "total_h": total / 3600,
            "layers": f"{dense} dense + {moe} MoE"}


# ------------------------------------------------------------------------------- main


def table(doc: dict) -> str:
    rows = [("run", "status", "layer", "kind", "s", "GPU alloc", "GPU nvml", "predicted",
             "RSS hw", "RAM plan")]
    for c in doc["runs"]:
        name = f"{c['method']} {c['vram_budget']}/{c['ram_budget']}"
        for x in c.get("layers") or [{}]:
            g = lambda k: f"{x[k] / GIB:.1f}G" if x.get(k) else "-"  # noqa: E731
            rows.append((name, c["status"], str(x.get("index", "-")), x.get("kind", "-"),
                         f"{x['seconds']:.1f}" if x.get("seconds") else "-", g("allocated"),
                         g("nvml_process"), g("predicted"), g("rss"),
                         f"{c['plan_ram'] / GIB:.1f}G" if c.get("plan_ram") else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    for c in doc["runs"]:
        e, chk = c.get("eta") or {}, c.get("export_check") or {}
        lines.append(f"{c['method']} {c['vram_budget']}/{c['ram_budget']}: peak RSS (sampled) "
                     f"{c.get('peak_rss_sampled', 0) / GIB:.1f} GiB; export check "
                     f"{chk.get('status')} err {chk.get('rel_error')}; full DeepSeek-V3 ETA "
                     + (f"{e['total_h']:.2f} h (dense {e['dense_s']:.1f} s, MoE "
                        f"{e['moe_s']:.1f} s/layer)" if e else "-"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--scratch", default="/tmp/layerquant_giant")
    p.add_argument("--runs", default="gptq:80G:64G,awq:80G:64G,gptq:48G:32G")
    p.add_argument("--dense", type=int, default=3)
    p.add_argument("--moe", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--time-budget", type=float, default=500)
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (a smoke test)")
    args = p.parse_args(argv)
    from quantizer import logs
    logs.configure()  # the generator's progress lines on stderr
    if args.tiny:
        args.samples, args.seqlen, args.vocab = min(args.samples, 4), min(args.seqlen, 16), 512
    t_start = time.perf_counter()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    doc = {"args": vars(args), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "python": platform.python_version(), "environment": environment(), "runs": []}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str))

    doc["disk_free_before"] = shutil.disk_usage(scratch).free
    elements = layer_elements(args)
    src, doc["checkpoint"] = generate(args, scratch)
    doc["disk_free_after_checkpoint"] = free = shutil.disk_usage(scratch).free
    # The job's layer files and the staged export coexist until it is published: where the
    # disk cannot hold both beside the checkpoint, the job directory goes to /dev/shm (files
    # there are the kernel's shared memory, not this process's RSS) and the JSON says so.
    export = int((args.dense * elements["dense"] + args.moe * elements["moe"]) * 0.53)
    work_dir = None
    if free < 2.2 * export and Path("/dev/shm").is_dir() and not args.tiny:
        work_dir = Path("/dev/shm/layerquant_giant_job")
        doc["work_dir"] = f"{work_dir} (disk free {free / GIB:.1f} GiB < 2.2 x export)"
    save()
    log(f"checkpoint: {doc['checkpoint']}")
    for spec in args.runs.split(","):
        method, vram, ram = spec.split(":")
        left = args.time_budget - (time.perf_counter() - t_start)
        done = [c for c in doc["runs"] if c.get("wall_s")]
        est = max((c["wall_s"] for c in done), default=0) * (1.3 if method == "awq" else 1.0)
        if done and est > left:
            doc["runs"].append({"method": method, "vram_budget": vram, "ram_budget": ram,
                                "status": f"skipped: estimate {est:.0f} s > {left:.0f} s left"})
            save()
            continue
        log(f"run {method} {vram}/{ram} ({left:.0f} s left)")
        case = run_case(args, src, scratch, method, vram, ram, timeout=max(30.0, left - 5),
                        work_dir=work_dir)
        case["eta"] = eta(case, elements)
        doc["runs"].append(case)
        save()
        log(f"  {case['status']} in {case['wall_s']:.0f} s")
    doc["elapsed_s"] = time.perf_counter() - t_start
    doc["tables"] = table(doc)
    save()
    print(doc["tables"])
    return 0 if all(c["status"] in ("ok",) or c["status"].startswith("skipped")
                    for c in doc["runs"]) else 1


def environment() -> dict:
    env = {"host": platform.node()}
    try:
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # the record says why
        env["error"] = repr(e)
    return env


if __name__ == "__main__":
    sys.exit(main())
