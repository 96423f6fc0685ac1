"""Choose and launch the kernel for one QuantLinear call.

`quant_matmul(x, kw, bias)` checks its inputs and runs the plan cached for (M, bias) on the
KernelWeight, so a decode step costs a dict lookup plus its launches and can be captured in
a CUDA graph (no host syncs, no tuning while capturing; make one eager call per M first).

Paths ("kinds"), all computing the same function within the stated tolerances:
- "gemv", "dot", "dequant": the Triton kernels of kernels/triton_w4a16.py ("dequant" writes
  the dense weight once and calls cuBLAS through F.linear);
- "tinygemm": torch's `_weight_int4pack_mm` (kernels/tinygemm.py), where it is exact.

The choice per (M bucket, N, K, bits, group size, group mode, dtype, bias) comes from, in
order: this process's tuning results, the on-disk cache of this GPU kind
(kernels/tuning_cache.py), tuning now (when on: `set_autotune(True)` or
LAYERQUANT_AUTOTUNE=1), else a heuristic. Tuning times every candidate the way the benchmark
does (CUDA-graph replay over copies of the weight, so it never sits in L2) and keeps only
candidates whose output matches the float32 reference within BOUND: the fastest choice is
exact by construction. Tuning keys and cache files hold the GPU's name, capability and SM
count: results never cross GPU kinds.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton

from quantizer.kernels import tinygemm
from quantizer.kernels import triton_w4a16 as K
from quantizer.kernels import tuning_cache
from quantizer.kernels.packing import kernel_container_bits

logger = logging.getLogger(__name__)

ACT_DTYPES = (torch.float16, torch.bfloat16)
# ||y - ref|| / ||ref|| a path must meet to be chosen (ref: float32 math on the same weight)
BOUND = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
KINDS = ("gemv", "dot", "dequant", "tinygemm")
_AUTOTUNE = [os.environ.get("LAYERQUANT_AUTOTUNE", "0") == "1"]
_TUNED: dict[tuple, "LaunchConfig"] = {}
_DEVICE_KEYS: dict[int, tuple] = {}


@dataclass(frozen=True)
class LaunchConfig:
    kind: str  # one of KINDS
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128  # inputs per run of words (words per run = block_k * cb / 32)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = False  # dot: (W @ x^T)^T, the weight tile on the MMA's 64-row side
    prefetch: bool = False  # gemv: next run's words loaded before this run computes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LaunchConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def set_autotune(enabled: bool) -> None:
    _AUTOTUNE[0] = enabled


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_key(device: torch.device) -> tuple:
    """(name, capability, SM count) of a CUDA device: part of every tuning key."""
    if device.type != "cuda":
        return ("cpu-interpreter",)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_KEYS:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_KEYS[idx] = (props.name, props.major, props.minor, props.multi_processor_count)
    return _DEVICE_KEYS[idx]


def _sms(dkey: tuple) -> int:
    return dkey[3] if len(dkey) > 3 else 4


def m_bucket(M: int) -> int:
    return min(1 << max(0, (M - 1).bit_length()), 4096)


def group_mode(kw, block_kw: int | None = None) -> int:
    """0: contiguous groups that are whole blocks of the layout (and runs of block_kw words
    inside one block); 1: group k // G per value; 2: gathered through g_idx."""
    if kw.g_idx is not None:
        return 2
    pw = 32 // kernel_container_bits(kw.bits)
    whole = kw.block_words * pw == kw.group_size
    return 0 if whole and (block_kw is None or kw.block_words % block_kw == 0) else 1


def tuning_key(kw, M: int, dtype: torch.dtype, has_bias: bool) -> str:
    return (f"M{m_bucket(M)}|N{kw.out_features}|K{kw.in_features}|b{kw.bits}"
            f"|g{kw.group_size}|mode{group_mode(kw)}|{str(dtype).replace('torch.', '')}"
            f"|bias{int(has_bias)}")


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _auto_split(tiles: int, k_runs: int, sms: int, per_sm: int = 2) -> int:
    """Split K until the launch holds ~per_sm programs per SM, keeping >= 2 runs per split."""
    split = 1
    while tiles * split < per_sm * sms and split * 4 <= k_runs and split < 32:
        split *= 2
    return split


def _runs(kw, block_k: int) -> int:
    return max(1, kw.in_features // max(block_k, 1))


def default_config(kw, M: int, sms: int) -> LaunchConfig:
    N = kw.out_features
    if M <= 4:
        bm, bn = _pow2(M), 128
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        return LaunchConfig("gemv", bm, bn, 128, _auto_split(tiles, _runs(kw, 128), sms, 4))
    if M <= 64:
        bm, bn = max(16, _pow2(M)), 128
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        return LaunchConfig("dot", bm, bn, 128, _auto_split(tiles, _runs(kw, 128), sms), 4, 3,
                            swap=True)
    if M <= 1024:
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        return LaunchConfig("dot", 128, 128, 128, _auto_split(tiles, _runs(kw, 128), sms, 1),
                            8, 3)
    return LaunchConfig("dequant", block_n=64, block_k=128)


def candidate_configs(kw, M: int, sms: int, dtype: torch.dtype) -> list[LaunchConfig]:
    """What tuning times for this call shape (the default first)."""
    N = kw.out_features
    out = [default_config(kw, M, sms)]
    if M <= 4:
        bm = _pow2(M)
        for bn, warps, prefetch in ((64, 2, False), (128, 4, False), (128, 4, True),
                                    (256, 8, False)):
            tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
            for per_sm in (2, 4, 8):
                split = _auto_split(tiles, _runs(kw, 128), sms, per_sm)
                out.append(LaunchConfig("gemv", bm, bn, 128, split, warps, prefetch=prefetch))
    if 2 <= M <= 128:
        bm = min(max(16, _pow2(M)), 64)
        for bn, stages in ((64, 3), (128, 3), (128, 4)):
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            for per_sm in (1, 2):
                split = _auto_split(tiles, _runs(kw, 128), sms, per_sm)
                out.append(LaunchConfig("dot", bm, bn, 128, split, 4, stages, swap=True))
    if M >= 32:
        for bm, bn, warps, stages in ((64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3),
                                      (128, 64, 4, 4)):
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            split = _auto_split(tiles, _runs(kw, 128), sms, 1)
            out.append(LaunchConfig("dot", bm, bn, 128, split, warps, stages))
            if split > 1:
                out.append(LaunchConfig("dot", bm, bn, 128, 1, warps, stages))
    out.append(LaunchConfig("dequant", block_n=64, block_k=128))
    if tinygemm.eligible(kw, dtype) and kw.device.type == "cuda" and tinygemm.accepts(kw, dtype):
        out.append(LaunchConfig("tinygemm"))
    return list(dict.fromkeys(out))  # unique, in order


class _Plan:
    """Everything one launch needs that does not depend on the input's data pointer."""

    def __init__(self, kw, M: int, cfg: LaunchConfig, has_bias: bool):
        if cfg.kind not in KINDS:
            raise ValueError(f"unknown kernel kind {cfg.kind!r} (one of {KINDS})")
        self.cfg, self.M, self.has_bias = cfg, M, has_bias
        self.counters = None
        if cfg.kind == "tinygemm":
            if not tinygemm.eligible(kw, kw.dtype):
                raise ValueError("tinygemm cannot compute this weight exactly")
            _tinygemm_form(kw)
            return
        N, Kdim = kw.out_features, kw.in_features
        cb = kernel_container_bits(kw.bits)
        pw, bw = 32 // cb, kw.block_words
        bkw = max(1, cfg.block_k // pw)
        if cfg.kind == "gemv" and bkw > bw and group_mode(kw) == 0 and bw & (bw - 1) == 0:
            bkw = bw  # whole runs inside one group: scales once per run
        if cfg.kind == "dot":
            bkw = max(bkw, 16)  # each slot's tl.dot needs K >= 16
        self.kp = Kdim // pw
        mode = group_mode(kw, bkw)
        self.vmask = (1 << cb) - 1
        if cfg.kind == "dequant":
            self.kernel = K._dequant_kernel
            self.grid: tuple[int, ...] = (triton.cdiv(self.kp, bkw), triton.cdiv(N, cfg.block_n))
            self.meta = dict(CB=cb, BW=bw, BLOCK_N=cfg.block_n, BLOCK_KW=bkw,
                             GROUP_MODE=group_mode(kw), num_warps=cfg.num_warps)
            return
        w_per_split = triton.cdiv(triton.cdiv(self.kp, cfg.split_k), bkw) * bkw
        self.w_per_split = w_per_split
        self.split = triton.cdiv(self.kp, w_per_split)
        common = dict(SPLIT=self.split > 1, CB=cb, BW=bw, BLOCK_N=cfg.block_n, BLOCK_KW=bkw,
                      GROUP_MODE=mode, HAS_BIAS=has_bias, num_warps=cfg.num_warps)
        if cfg.kind == "gemv":
            if cfg.block_m not in (1, 2, 4):
                raise ValueError("the gemv kernel takes 1, 2 or 4 rows per program")
            self.kernel = K._gemv_kernel
            self.grid = (triton.cdiv(N, cfg.block_n), self.split, triton.cdiv(M, cfg.block_m))
            self.meta = dict(BLOCK_M=cfg.block_m, PREFETCH=cfg.prefetch, **common)
            tiles = self.grid[0] * self.grid[2]
        else:
            self.kernel = K._dot_kernel
            self.grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), self.split)
            self.meta = dict(BLOCK_M=cfg.block_m, GROUP_M=8, SWAP=cfg.swap,
                             num_stages=cfg.num_stages, **common)
            tiles = self.grid[0]
        if self.split > 1:  # one arrival counter per output tile; the last arrival resets it
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=kw.device)

    def run(self, x2: torch.Tensor, kw, bias: torch.Tensor | None) -> torch.Tensor:
        M, N, Kdim = self.M, kw.out_features, kw.in_features
        kind = self.cfg.kind
        if kind == "tinygemm":
            return tinygemm.matmul(x2, _tinygemm_form(kw), bias)
        gidx = kw.g_idx if kw.g_idx is not None else kw.words  # unused unless GROUP_MODE 2
        if kind == "dequant":
            w = torch.empty((N, Kdim), dtype=x2.dtype, device=x2.device)
            self.kernel[self.grid](kw.words, kw.scales, kw.zeros, gidx, w, N, Kdim, self.kp,
                                   kw.group_size, self.vmask, **self.meta)
            return F.linear(x2, w, bias)
        out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        ws = out if self.split == 1 else torch.empty((self.split, M, N), dtype=torch.float32,
                                                     device=x2.device)
        cnt = self.counters if self.counters is not None else kw.words
        b = bias if bias is not None else out
        self.kernel[self.grid](x2, kw.words, kw.scales, kw.zeros, gidx, b, out, ws, cnt, M, N,
                               Kdim, self.kp, x2.stride(0), kw.group_size, self.w_per_split,
                               self.vmask, self.split, **self.meta)
        return out


def _tinygemm_form(kw) -> tinygemm.TinyGemmWeight:
    tg = kw.extra.get("tinygemm")
    if tg is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("tinygemm's weight form is built outside CUDA-graph capture: "
                               "make one eager call per M before capturing")
        tg = kw.extra["tinygemm"] = tinygemm.build(kw, kw.dtype)
    return tg


def _check_inputs(x: torch.Tensor, kw, bias: torch.Tensor | None) -> None:
    if x.device != kw.device:
        raise ValueError(f"quantized matmul: input is on {x.device} but the weight is on "
                         f"{kw.device}; move them to one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the quantized-matmul kernels need CUDA tensors, got a {x.device.type} "
                         "tensor (QuantLinear computes CPU inputs by dequantize + matmul)")
    if x.dtype not in ACT_DTYPES or x.dtype != kw.dtype:
        raise TypeError(f"activations must be float16/bfloat16 matching the weight's "
                        f"{kw.dtype}, got {x.dtype}")
    if x.shape[-1] != kw.in_features:
        raise ValueError(f"input last dim {x.shape[-1]} != in_features {kw.in_features}")
    if bias is not None and (bias.device != x.device or bias.shape != (kw.out_features,)
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({kw.out_features},) tensor on {x.device}")


# ---- tuning ----------------------------------------------------------------------------
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def exact_enough(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """The gate every tuned path passes: finite, and within BOUND[dtype] of the reference."""
    return bool(torch.isfinite(y).all()) and rel_err(y, ref) <= BOUND[dtype]


def _weight_copy(kw):
    """A KernelWeight sharing nothing with kw's device tensors (for L2-cold timing)."""
    c = copy.copy(kw)
    c.words, c.scales, c.zeros = kw.words.clone(), kw.scales.clone(), kw.zeros.clone()
    c.plans, c.extra = {}, {}
    if "tinygemm" in kw.extra:
        tg = kw.extra["tinygemm"]
        c.extra["tinygemm"] = tinygemm.TinyGemmWeight(tg.weight.clone(), tg.scales_zeros.clone(),
                                                      tg.group_size)
    return c


def _weight_bytes(kw) -> int:
    return sum(t.numel() * t.element_size() for t in (kw.words, kw.scales, kw.zeros))


def _rotation_size(kw) -> int:
    """Copies of the weight so that one round of calls is ~4x the L2 (2..8 copies), within
    a quarter of the free memory."""
    props = torch.cuda.get_device_properties(kw.device)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    n = min(8, max(2, math.ceil(4 * l2 / max(_weight_bytes(kw), 1))))
    try:
        free, _ = torch.cuda.mem_get_info(kw.device)
        n = max(1, min(n, free // 4 // max(2 * _weight_bytes(kw), 1)))
    except RuntimeError:
        pass
    return n


def time_graph(fns: list[Callable[[], object]], replays: int = 15) -> float:
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
    del g
    return statistics.median(times)


def _time_plan(plan: _Plan, x2, weights, bias) -> float:
    return time_graph([functools.partial(plan.run, x2, w, bias) for w in weights])


@dataclass
class TuneResult:
    config: LaunchConfig
    ms: float
    err: float


def tune(kw, x2: torch.Tensor, bias: torch.Tensor | None, M: int, sms: int,
         candidates: list[LaunchConfig] | None = None,
         timer: Callable | None = None) -> tuple[LaunchConfig, list[TuneResult]]:
    """Time every candidate that computes the reference within BOUND; return the fastest
    and every (config, ms, err) measured (rejected ones carry ms = inf)."""
    dtype = x2.dtype
    timer = timer or _time_plan
    gen = torch.Generator(device=x2.device).manual_seed(0)
    xt = torch.randn(x2.shape, generator=gen, device=x2.device).to(dtype)  # never zeros
    ref = xt.float() @ kw.dequantize(torch.float32)
    if bias is not None:
        ref += bias.float()
    cuda = x2.is_cuda
    weights = [kw] + ([_weight_copy(kw) for _ in range(_rotation_size(kw) - 1)] if cuda else [])
    results: list[TuneResult] = []
    for cfg in candidates or candidate_configs(kw, M, sms, dtype):
        try:
            plan = _Plan(kw, M, cfg, bias is not None)
            y = plan.run(xt, kw, bias)
            err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
            if err > BOUND[dtype]:
                logger.warning("kernel %s rejected: rel err %.2e > %.0e (M=%d, N=%d, K=%d, %s)",
                               cfg, err, BOUND[dtype], M, kw.out_features, kw.in_features, dtype)
                results.append(TuneResult(cfg, float("inf"), err))
                continue
            if cfg.kind == "tinygemm":
                for w in weights[1:]:
                    if "tinygemm" not in w.extra:
                        w.extra["tinygemm"] = _weight_copy(kw).extra["tinygemm"]
            ms = timer(plan, xt, weights, bias)
        except Exception as exc:  # a config this GPU/compiler cannot run is skipped
            logger.debug("kernel %s skipped: %s", cfg, exc)
            continue
        results.append(TuneResult(cfg, ms, err))
    ok = [r for r in results if math.isfinite(r.ms)]
    if not ok:
        raise RuntimeError(f"no kernel computed this layer exactly (M={M}, "
                           f"N={kw.out_features}, K={kw.in_features}, {dtype})")
    best = min(ok, key=lambda r: r.ms)
    if best.config.kind != "tinygemm" and not any(
            p.cfg.kind == "tinygemm" for p in kw.plans.values()):
        kw.extra.pop("tinygemm", None)  # K*N/2 bytes kept only where tinygemm runs
    return best.config, results


def _lookup(kw, x2, bias, dkey: tuple) -> LaunchConfig | None:
    """The tuned choice for this call shape: this process's, this GPU kind's cache file, or
    tuning now (when on and allowed)."""
    M = x2.shape[0]
    tkey = tuning_key(kw, M, x2.dtype, bias is not None)
    config = _TUNED.get((dkey, tkey))
    if config is not None or not x2.is_cuda:
        return config
    cached = tuning_cache.tuning_file(dkey).get(tkey)
    if cached is not None:
        config = _TUNED[(dkey, tkey)] = LaunchConfig.from_json(cached["config"])
        return config
    if _AUTOTUNE[0] and not torch.cuda.is_current_stream_capturing():
        config, results = tune(kw, x2, bias, M, _sms(dkey))
        _TUNED[(dkey, tkey)] = config
        best_ms = min(r.ms for r in results)
        tuning_cache.tuning_file(dkey).put(tkey, {"config": config.to_json(), "ms": best_ms,
                                                  "candidates": len(results)})
        logger.info("tuned %s on %s: %s (%.1f us)", tkey, dkey[0], config, best_ms * 1e3)
    return config


def _plan_for(kw, x2: torch.Tensor, bias, config: LaunchConfig | None) -> _Plan:
    M = x2.shape[0]
    key = (M, bias is not None, config)
    plan = kw.plans.get(key)
    if plan is not None:
        return plan
    dkey = device_key(x2.device)
    chosen = config or _lookup(kw, x2, bias, dkey) or default_config(kw, M, _sms(dkey))
    capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
    if chosen.kind == "tinygemm" and capturing and "tinygemm" not in kw.extra:
        chosen = default_config(kw, M, _sms(dkey))  # its weight form cannot be built now
    plan = kw.plans[key] = _Plan(kw, M, chosen, bias is not None)
    return plan


def quant_matmul(x: torch.Tensor, kw, bias: torch.Tensor | None = None,
                 config: LaunchConfig | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a KernelWeight `kw` (kernels/quant_linear.py); any leading dims."""
    _check_inputs(x, kw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.in_features)
    if x2.stride(-1) != 1:
        raise ValueError("quantized matmul: input must be contiguous in its last dimension")
    if kw.perm is not None:
        x2 = x2.index_select(1, kw.perm)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, kw.out_features)
    # every launch (tuning's timed ones, the stream-capture check, tinygemm's packing) goes to
    # the weight's GPU even when another one is current
    switch = x2.is_cuda and x2.device.index != torch.cuda.current_device()
    ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if switch:
        ctx = torch.cuda.device(x2.device)
    with ctx:
        plan = _plan_for(kw, x2, bias, config)
        if plan.cfg.kind == "tinygemm" and not x2.is_contiguous():
            x2 = x2.contiguous()
        y = plan.run(x2, kw, bias)
    return y.reshape(*lead, kw.out_features)


__all__ = ["LaunchConfig", "quant_matmul", "set_autotune", "tune", "candidate_configs",
           "default_config", "device_key", "tuning_key", "exact_enough", "BOUND"]
