"""W4A16 kernels against torch's tinygemm and cuBLAS, in one process, plus GPU-only checks.

Per (dtype, N x K, M): 8 different weight matrices (so a weight never sits in L2 between
calls) are called in turn inside one CUDA graph; the per-call time is the median graph replay
/ 8. Three columns, same inputs, same method:
- ours: `quant_matmul` with the config the dispatch chose for this call shape (tuned here,
  over every candidate path: our Triton kernels, dequantize + cuBLAS, torch tinygemm; the
  tuning results go to the dispatch's on-disk cache of this GPU kind),
- tinygemm: `torch.ops.aten._weight_int4pack_mm` on the same codes (where torch takes the
  dtype: bf16 only on torch 2.11),
- cuBLAS: F.linear on the dense dequantized weights (the reference speed, ratio = 1).
Every timed path is checked against a float32 reference. Writes JSON (with the command) to
--out and the tables as Markdown beside it (same name, .md).

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from quantizer.kernels import tinygemm
from quantizer.kernels import triton_dispatch as D
from quantizer.kernels import tuning_cache
from quantizer.kernels.packing import QuantizedWeight
from quantizer.kernels.quant_linear import KernelWeight, QuantLinear

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096)]  # (N, K)
MS = [1, 4, 16, 64, 256, 4096]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DNAMES = {v: k for k, v in DTYPES.items()}
time_graph = D.time_graph


def random_weight(N, K, bits, gs, device, dtype=torch.float16):
    maxq = (1 << bits) - 1
    ng = K // gs
    return QuantizedWeight(
        codes=torch.randint(0, maxq + 1, (N, K), device=device, dtype=torch.uint8),
        scales=(torch.rand(N, ng, device=device) * 0.01 + 1e-3).to(dtype).float(),
        zeros=torch.randint(0, maxq + 1, (N, ng), device=device, dtype=torch.int32),
        bits=bits, group_size=gs)


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def useful_bytes(N, K, M, gs, elt=2):
    """Fewest bytes ours must move: int4 codes, fp16 scales and zeros, x in, y out."""
    return N * K // 2 + N * (K // gs) * 2 * elt + elt * M * (K + N)


def cfg_text(cfg: D.LaunchConfig) -> str:
    if cfg.kind == "tinygemm":
        return "tinygemm"
    if cfg.kind == "dequant":
        return "dequant+cuBLAS"
    extra = (" swap" if cfg.swap else "") + (" pf" if cfg.prefetch else "")
    return (f"{cfg.kind} bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} sk{cfg.split_k} "
            f"w{cfg.num_warps} s{cfg.num_stages}{extra}")


def bench_shape(N, K, ms, dtype, n_weights, replays, gs, log, deadline):
    dev = torch.device("cuda", torch.cuda.current_device())
    dkey = D.device_key(dev)
    rows = []
    qs = [random_weight(N, K, 4, gs, dev) for _ in range(n_weights)]
    kws = [KernelWeight(q, dtype, dev) for q in qs]
    dense = [q.dequantize(dtype) for q in qs]  # (N, K) like nn.Linear
    del qs
    tg_ok = tinygemm.eligible(kws[0], dtype) and tinygemm.accepts(kws[0], dtype)
    tgs = [tinygemm.build(kw, dtype) for kw in kws] if tg_ok else []
    for M in ms:
        if time.time() > deadline:
            log(f"time budget spent: skipping {N}x{K} M={M} {dtype}")
            rows.append(dict(N=N, K=K, M=M, dtype=DNAMES[dtype], skipped="time budget"))
            continue
        x = torch.randn(M, K, device=dev, dtype=dtype)
        t0 = time.time()
        best, results = D.tune(kws[0], x, None, M, dkey[3])
        tune_s = time.time() - t0
        tkey = D.tuning_key(kws[0], M, dtype, False)
        D._TUNED[(dkey, tkey)] = best
        tuning_cache.tuning_file(dkey).put(tkey, {"config": best.to_json(),
                                                  "ms": min(r.ms for r in results),
                                                  "candidates": len(results)})
        ref = x.float() @ dense[0].float().t()
        y = D.quant_matmul(x, kws[0], config=best)
        err = rel_err(y, ref)
        for kw in kws[1:]:  # builds each weight's plan (and tinygemm form) outside capture
            D.quant_matmul(x, kw, config=best)
        t_q = time_graph([lambda kw=kw: D.quant_matmul(x, kw, config=best) for kw in kws],
                         replays)
        t_c = time_graph([lambda w=w: F.linear(x, w) for w in dense], replays)
        row = dict(N=N, K=K, M=M, dtype=DNAMES[dtype], ours_ms=t_q,
                   cublas_ms=t_c, ours_vs_cublas=t_c / t_q, ours_err=err,
                   config=best.to_json(), config_text=cfg_text(best), tune_s=tune_s,
                   candidates=[dict(config=cfg_text(r.config), ms=r.ms, err=r.err)
                               for r in results],
                   ours_TBps=useful_bytes(N, K, M, gs) / (t_q * 1e-3) / 1e12,
                   cublas_TBps=(2 * N * K + 2 * M * (K + N)) / (t_c * 1e-3) / 1e12)
        if tgs:
            y_tg = tinygemm.matmul(x, tgs[0], None)
            row["tinygemm_err"] = rel_err(y_tg, ref)
            t_t = time_graph([lambda t=t: tinygemm.matmul(x, t, None) for t in tgs], replays)
            row.update(tinygemm_ms=t_t, tinygemm_vs_cublas=t_c / t_t, ours_vs_tinygemm=t_t / t_q)
        rows.append(row)
        tg_txt = (f"tinygemm {row['tinygemm_ms']*1e3:8.1f} us (x{row['tinygemm_vs_cublas']:.2f})"
                  if tgs else "tinygemm      n/a")
        log(f"{row['dtype']} {N:>6}x{K:<6} M={M:<5} ours {t_q*1e3:8.1f} us "
            f"(x{t_c/t_q:5.2f})  {tg_txt}  cublas {t_c*1e3:8.1f} us  err {err:.1e}  "
            f"[{cfg_text(best)}] tuned {tune_s:.1f}s")
        row["exact"] = bool(err <= D.BOUND[dtype] and torch.isfinite(y).all())
        if not row["exact"]:
            log(f"ERROR: ours is off the reference: {err:.2e} > {D.BOUND[dtype]:.0e}")
    del kws, dense, tgs
    torch.cuda.empty_cache()
    return rows


def _compile_worker(jobs):
    """Compile (by one small launch each) the kernels of `jobs` into the shared Triton cache."""
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    errors, weights = [], {}
    for dname, cfg_json, has_bias in jobs:
        dtype = DTYPES[dname]
        if dname not in weights:
            weights[dname] = KernelWeight(random_weight(1024, 1024, 4, 128, dev), dtype, dev)
        kw = weights[dname]
        cfg = D.LaunchConfig.from_json(cfg_json)
        try:
            M = max(cfg.block_m, 1)
            x = torch.randn(M, 1024, device=dev, dtype=dtype)
            b = torch.randn(1024, device=dev, dtype=dtype) if has_bias else None
            D._Plan(kw, M, cfg, has_bias).run(x, kw, b)
        except Exception as exc:  # reported; tuning skips such a config too
            errors.append(f"{dname} {cfg_text(cfg)}: {exc}")
    torch.cuda.synchronize()
    return errors


def precompile(shapes, ms, dtypes, gs, workers, log):
    """Every kernel tuning and the checks will launch, compiled in `workers` processes first:
    kernels are specialized only on constexprs and divisibility (not M or the split count),
    so a small launch per config compiles what the large shapes run."""
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = D.device_key(dev)[3]
    jobs = set()
    for dname in dtypes:
        for N, K in shapes + [(1024, 2048)]:
            stub = SimpleNamespace(out_features=N, in_features=K, bits=4, group_size=gs,
                                   block_words=gs // 8, g_idx=None, device=dev,
                                   dtype=DTYPES[dname])
            for M in ms:
                for cfg in D.candidate_configs(stub, M, sms, DTYPES[dname]):
                    if cfg.kind == "tinygemm":
                        continue
                    splits = (1,) if cfg.kind == "dequant" else (1, 2)
                    for sk in splits:
                        c = D.LaunchConfig.from_json({**cfg.to_json(), "split_k": sk})
                        jobs.add((dname, json.dumps(c.to_json(), sort_keys=True), False))
            for M in (1, 2, 5, 33, 300, 2048):  # gpu_checks: default plans with a bias
                cfg = D.default_config(stub, M, sms)
                jobs.add((dname, json.dumps(cfg.to_json(), sort_keys=True), True))
    jobs = sorted(jobs)
    chunks = [[(d, json.loads(c), b) for d, c, b in jobs[i::workers]] for i in range(workers)]
    t0 = time.time()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        errors = [e for part in pool.map(_compile_worker, chunks) for e in part]
    log(f"precompiled {len(jobs)} kernel launches in {workers} processes: "
        f"{time.time() - t0:.0f} s; {len(errors)} failed")
    for e in errors:
        log(f"  compile/launch failed: {e}")
    return dict(launches=len(jobs), seconds=time.time() - t0, errors=errors)


def gpu_checks(log):
    """Layouts x dtypes x M (default plans) against float64; eager vs graph; split-K repeat;
    mixed-device error; cuda:1 while on cuda:0."""
    out = {}
    dev = torch.device("cuda", torch.cuda.current_device())
    tuning = D._AUTOTUNE[0]
    D.set_autotune(False)  # the checks exercise the default (heuristic) plans
    q = random_weight(1024, 2048, 4, 128, dev)
    bias = torch.randn(1024, device=dev)
    for layout in ("awq", "gptq", "compressed-tensors"):
        m = QuantLinear.from_quantized(q, layout=layout, bias=bias)
        for dtype, bound in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
            for M in ((1, 2, 5, 33, 300, 2048) if layout == "awq" else (1, 33)):
                x = torch.randn(M, 2048, device=dev, dtype=dtype)
                ref = x.double() @ q.dequantize(torch.float64).t() + m.bias.double()
                y = m(x)
                ys = [m(x) for _ in range(3)]  # split-K counters reset between calls
                assert all(torch.equal(y, y2) for y2 in ys), "not deterministic"
                e = rel_err(y.double(), ref.float())
                assert e < bound, (layout, dtype, M, e)
                out[f"{layout}/{dtype}/M{M}"] = e
    m = QuantLinear.from_quantized(q, layout="awq")
    x = torch.randn(1, 2048, device=dev, dtype=torch.float16)
    y_eager = m(x)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y_graph = m(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    out["graph_equals_eager"] = bool(torch.equal(y_graph, y_eager))
    assert out["graph_equals_eager"]
    for _ in range(20):
        m(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        m(x)
    torch.cuda.synchronize()
    out["eager_us_per_call_M1"] = (time.perf_counter() - t0) / 300 * 1e6
    try:
        m(x.cpu())
        out["mixed_device_error"] = "no error raised"
    except ValueError as exc:
        out["mixed_device_error"] = str(exc)
    if torch.cuda.device_count() >= 2:
        torch.cuda.set_device(0)
        m1 = QuantLinear.from_quantized(random_weight(512, 1024, 4, 128, "cuda:1"), layout="gptq")
        x1 = torch.randn(3, 1024, device="cuda:1", dtype=torch.float16)
        ref = x1.double() @ m1.dequantize(torch.float64).t()
        e = rel_err(m1(x1).double(), ref.float())
        assert e < 1e-3 and torch.cuda.current_device() == 0
        out["cuda1_rel_err"] = e
    else:
        out["cuda1_test"] = "skipped: one GPU"
    D.set_autotune(tuning)
    log(json.dumps(out, indent=1))
    return out


def profile(spec: str, gs: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    D.set_autotune(True)
    for item in spec.split(","):
        shape, M, dname = item.split(":")
        N, K = (int(v) for v in shape.split("x"))
        kw = KernelWeight(random_weight(N, K, 4, gs, dev), DTYPES[dname], dev)
        x = torch.randn(int(M), K, device=dev, dtype=DTYPES[dname])
        D.quant_matmul(x, kw)  # plan (tuned or cached)
        torch.cuda.synchronize()
        print(f"profile {item}: {cfg_text(kw.plans[(int(M), False, None)].cfg)}", flush=True)
        for _ in range(3):
            D.quant_matmul(x, kw)
        torch.cuda.synchronize()


def tables(result) -> str:
    """Markdown: per dtype, ours/cuBLAS, tinygemm/cuBLAS, ours vs tinygemm per shape and M."""
    lines = [f"`{result['command']}` on {result['device']} (torch {result['torch']}, "
             f"triton {result['triton']}); ratio = cuBLAS time / time (higher is faster)", ""]
    ms = result["ms"]
    for dname in result["dtypes"]:
        rows = [r for r in result["rows"] if r.get("dtype") == dname and "ours_ms" in r]
        if not rows:
            continue
        lines += [f"### {dname}", "",
                  "| N x K | what | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|" + "---|" * len(ms)]
        for N, K in result["shapes"]:
            cells = {r["M"]: r for r in rows if (r["N"], r["K"]) == (N, K)}
            def line(what, fn):
                return (f"| {N}x{K} | {what} | " + " | ".join(
                    fn(cells[m]) if m in cells else "-" for m in ms) + " |")
            lines.append(line("ours / cuBLAS", lambda r: f"{r['ours_vs_cublas']:.2f}"))
            lines.append(line("tinygemm / cuBLAS", lambda r: f"{r['tinygemm_vs_cublas']:.2f}"
                              if "tinygemm_ms" in r else "n/a"))
            lines.append(line("ours / tinygemm", lambda r: f"{r['ours_vs_tinygemm']:.2f}"
                              if "tinygemm_ms" in r else "n/a"))
            lines.append(line("chosen", lambda r: r["config_text"].split(" bk")[0]))
        lines.append("")
        for r in rows:
            if r["M"] == 1:
                lines.append(f"- M=1 {r['N']}x{r['K']} {dname}: ours {r['ours_ms']*1e3:.1f} us "
                             f"= {r['ours_TBps']:.2f} TB/s useful; cuBLAS "
                             f"{r['cublas_TBps']:.2f} TB/s")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--compile-workers", type=int, default=8,
                    help="processes compiling every kernel first (0: compile while tuning)")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds; rows past it are skipped (recorded), never cut half way")
    ap.add_argument("--profile", default="",
                    help="NxK:M:dtype[,...]: only run the dispatch's choice for these (from the "
                         "tuning cache, else tuned) three times each, e.g. under ncu")
    args = ap.parse_args(argv)
    if args.profile:
        return profile(args.profile, args.group_size)
    log = lambda s: print(s, flush=True)  # noqa: E731
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    dtypes = args.dtypes.split(",")
    result = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                  device_key=list(D.device_key(torch.device("cuda", torch.cuda.current_device()))),
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  python=platform.python_version(), group_size=args.group_size,
                  weights_rotated=args.weights, replays=args.replays, shapes=shapes, ms=ms,
                  dtypes=dtypes, tuning_cache=str(tuning_cache.cache_dir()), rows=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(tables(result) + "\n")

    probe = SimpleNamespace(device=torch.device("cuda", torch.cuda.current_device()))
    result["tinygemm_takes"] = {
        dname: tinygemm.accepts(probe, DTYPES[dname])
        or tinygemm.REFUSALS.get((str(probe.device), DTYPES[dname]), False)
        for dname in DTYPES}
    log(f"torch tinygemm takes: {result['tinygemm_takes']}")
    t_start = time.time()
    deadline = t_start + args.time_budget
    if args.compile_workers > 0:
        result["precompile"] = precompile(shapes, ms, dtypes, args.group_size,
                                          args.compile_workers, log)
    if not args.skip_checks:
        try:
            result["checks"] = gpu_checks(log)
        except Exception:  # recorded; the tables still run
            log(traceback.format_exc())
            result["checks"] = dict(error=traceback.format_exc())
        save()
    for N, K in shapes:
        for dname in dtypes:
            try:
                result["rows"] += bench_shape(N, K, ms, DTYPES[dname], args.weights,
                                              args.replays, args.group_size, log, deadline)
            except Exception:  # recorded; the other shapes still run
                log(traceback.format_exc())
                result.setdefault("errors", []).append(
                    dict(N=N, K=K, dtype=dname, error=traceback.format_exc()))
                torch.cuda.empty_cache()
            save()  # a partial table survives a run cut short
    result["bench_seconds"] = time.time() - t_start
    save()
    log("\n" + tables(result))


if __name__ == "__main__":
    main()
