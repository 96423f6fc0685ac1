"""Benchmark the W4A16 Triton kernels against cuBLAS fp16, plus GPU-only correctness checks.

Per (N x K, M): 8 different weight matrices (so a weight never sits in L2 between calls) are
called in turn inside one CUDA graph; the per-call time is the median graph replay / 8. cuBLAS
fp16 (F.linear on the dequantized weights) runs the same way in the same process. Every timed
configuration is also checked against an fp32 reference. Writes JSON to --out, prints a table.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from quantizer.kernels import triton_dispatch as D
from quantizer.kernels.packing import QuantizedWeight
from quantizer.kernels.quant_linear import KernelWeight, QuantLinear

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096)]  # (N, K)
MS = [1, 4, 16, 32, 64, 128, 256, 4096]


def random_weight(N, K, bits, gs, device, dtype=torch.float16):
    maxq = (1 << bits) - 1
    ng = K // gs
    return QuantizedWeight(
        codes=torch.randint(0, maxq + 1, (N, K), device=device, dtype=torch.uint8),
        scales=(torch.rand(N, ng, device=device) * 0.01 + 1e-3).to(dtype).float(),
        zeros=torch.randint(0, maxq + 1, (N, ng), device=device, dtype=torch.int32),
        bits=bits, group_size=gs)


def time_graph(fns, replays: int) -> float:
    """Median ms per call of `fns` (one call each) captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up on the side stream, as capture requires
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    return statistics.median(times)


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench(shapes, ms, n_weights, replays, gs, log, save=lambda rows: None):
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for N, K in shapes:
        qs = [random_weight(N, K, 4, gs, dev) for _ in range(n_weights)]
        kws = [KernelWeight(q, torch.float16, dev) for q in qs]
        dense = [q.dequantize(torch.float16) for q in qs]  # (N, K) like nn.Linear
        del qs
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            y = D.quant_matmul(x, kws[0])  # tunes (when on) and caches the plan
            ref = x.float() @ dense[0].float().t()
            err = rel_err(y, ref)
            cfg = kws[0].plans[(M, False, None)].cfg
            for kw in kws[1:]:  # same tuned config for the rotation
                D.quant_matmul(x, kw)
            t_q = time_graph([lambda kw=kw: D.quant_matmul(x, kw) for kw in kws], replays)
            t_c = time_graph([lambda w=w: F.linear(x, w) for w in dense], replays)
            useful = N * K // 2 + N * (K // gs) * (2 + 0.5) + 2 * M * (K + N)
            row = dict(N=N, K=K, M=M, quant_ms=t_q, cublas_ms=t_c, speedup=t_c / t_q,
                       rel_err=err, config=cfg.__dict__,
                       useful_TBps=useful / (t_q * 1e-3) / 1e12,
                       cublas_TBps=(2 * N * K + 2 * M * (K + N)) / (t_c * 1e-3) / 1e12)
            rows.append(row)
            save(rows)  # a partial table survives a run cut short
            log(f"{N:>6}x{K:<6} M={M:<5} quant {t_q*1e3:8.1f} us  cublas {t_c*1e3:8.1f} us  "
                f"x{t_c/t_q:5.2f}  err {err:.1e}  {cfg.kind} bm{cfg.block_m} bn{cfg.block_n} "
                f"bk{cfg.block_k} sk{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}"
                f"{' rs' if cfg.reshape else ''}")
            assert err < 1e-3 and torch.isfinite(y).all(), (N, K, M, err)
        del kws, dense
        torch.cuda.empty_cache()
    return rows


def gpu_checks(log):
    """Eager vs graph, bf16 tensor-core path, mixed-device error, cuda:1 while on cuda:0."""
    out = {}
    dev = torch.device("cuda", torch.cuda.current_device())
    tuning = D._AUTOTUNE[0]
    D.set_autotune(False)  # the checks exercise the default (heuristic) plans
    q = random_weight(1024, 2048, 4, 128, dev)
    bias = torch.randn(1024, device=dev)
    for layout in ("awq", "gptq", "compressed-tensors"):
        m = QuantLinear.from_quantized(q, layout=layout, bias=bias)
        for dtype, bound in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
            for M in (1, 2, 5, 33, 300, 2048):
                x = torch.randn(M, 2048, device=dev, dtype=dtype)
                ref = x.double() @ q.dequantize(torch.float64).t() + m.bias.double()
                y = m(x)
                y2 = m(x)
                assert torch.equal(y, y2), "not deterministic"
                e = rel_err(y.double(), ref.float())
                assert e < bound, (layout, dtype, M, e)
                out[f"{layout}/{dtype}/M{M}"] = e
    # graph replay gives the eager result
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
    g.replay()
    torch.cuda.synchronize()
    out["graph_equals_eager"] = bool(torch.equal(y_graph, y_eager))
    assert out["graph_equals_eager"]
    # eager host latency at M=1 (decode-shaped call)
    for _ in range(20):
        m(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(500):
        m(x)
    torch.cuda.synchronize()
    out["eager_us_per_call_M1"] = (time.perf_counter() - t0) / 500 * 1e6
    log(f"eager QuantLinear call at M=1: {out['eager_us_per_call_M1']:.1f} us")
    # input on another device than the weight
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
        try:
            m1(x1.to("cuda:0"))
            out["cuda1_mixed_error"] = "no error raised"
        except ValueError as exc:
            out["cuda1_mixed_error"] = str(exc)
    else:
        out["cuda1_test"] = "skipped: one GPU"
    D.set_autotune(tuning)
    log(json.dumps(out, indent=1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-autotune", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args(argv)
    D.set_autotune(not args.no_autotune)
    log = lambda s: print(s, flush=True)  # noqa: E731
    result = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  python=platform.python_version(), group_size=args.group_size,
                  weights_rotated=args.weights, replays=args.replays)
    if not args.skip_checks:
        result["checks"] = gpu_checks(log)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    t0 = time.time()
    def save(rows):
        result["rows"] = rows
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    result["rows"] = bench(shapes, ms, args.weights, args.replays, args.group_size, log, save)
    result["bench_seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log("\n| N x K | " + " | ".join(f"M={m}" for m in ms) + " |")
    log("|---|" + "---|" * len(ms))
    for N, K in shapes:
        cells = [r for r in result["rows"] if (r["N"], r["K"]) == (N, K)]
        log(f"| {N}x{K} | " + " | ".join(f"{r['speedup']:.2f}x" for r in cells) + " |")
    for r in result["rows"]:
        if r["M"] == 1:
            log(f"M=1 {r['N']}x{r['K']}: {r['useful_TBps']:.2f} TB/s useful "
                f"(cuBLAS {r['cublas_TBps']:.2f} TB/s)")


if __name__ == "__main__":
    main()
