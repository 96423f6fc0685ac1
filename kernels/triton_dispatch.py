"""Choose and launch a kernel of kernels/triton_w4a16.py for one QuantLinear call.

`quant_matmul(x, kw, bias)` checks its inputs, picks a launch plan for this (weight, M) once
and caches it on the KernelWeight (so a decode step costs a dict lookup plus the launches, and
the call can be captured in a CUDA graph: no host syncs, no tuning while capturing).

Configs come from a heuristic, or, with autotuning on (`set_autotune(True)` or
LAYERQUANT_AUTOTUNE=1), from timing a few candidates once per key. The tuning cache key holds
the GPU's name and compute capability, so two GPU kinds in one process never share results.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import triton

from quantizer.kernels import triton_w4a16 as K
from quantizer.kernels.packing import kernel_container_bits

ACT_DTYPES = (torch.float16, torch.bfloat16)
_AUTOTUNE = [os.environ.get("LAYERQUANT_AUTOTUNE", "0") == "1"]
_TUNED: dict[tuple, "LaunchConfig"] = {}
_DEVICE_KEYS: dict[int, tuple] = {}


@dataclass(frozen=True)
class LaunchConfig:
    kind: str  # "gemv" | "dot" | "dequant" (dense weight once + torch.matmul)
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    reshape: bool = False  # dot: load each packed word once and reshape (vs repeated loads)


def set_autotune(enabled: bool) -> None:
    _AUTOTUNE[0] = enabled


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_key(device: torch.device) -> tuple:
    """(name, capability) of a CUDA device: part of every tuning key."""
    if device.type != "cuda":
        return ("cpu-interpreter",)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_KEYS:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_KEYS[idx] = (props.name, props.major, props.minor, props.multi_processor_count)
    return _DEVICE_KEYS[idx]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _auto_split(tiles: int, k_tiles: int, sms: int) -> int:
    """Split K until the launch holds ~2 programs per SM, keeping >= 2 K-tiles per split."""
    split = 1
    while tiles * split < 2 * sms and split * 4 <= k_tiles and split < 16:
        split *= 2
    return split


def default_config(M: int, N: int, Kdim: int, sms: int) -> LaunchConfig:
    # dot tiles load each packed word once (reshape=True): the repeated-address variant
    # pipelines a (BLOCK_K, BLOCK_N) int32 tile per stage and runs out of shared memory
    if M <= 2:
        bn, bk = 128, 128
        return LaunchConfig("gemv", M, bn, bk, _auto_split(triton.cdiv(N, bn), Kdim // bk, sms))
    if M <= 64:
        bm, bn, bk = max(16, _next_pow2(M)), 128 if M > 16 else 64, 128
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        return LaunchConfig("dot", bm, bn, bk, _auto_split(tiles, Kdim // bk, sms), 4, 4, True)
    if M <= 1024:
        return LaunchConfig("dot", 128 if M >= 128 else 64, 128, 64, 1, 8 if M >= 128 else 4, 3,
                            True)
    return LaunchConfig("dequant", block_n=128, block_k=32)


def candidate_configs(M: int, N: int, Kdim: int, sms: int) -> list[LaunchConfig]:
    base = default_config(M, N, Kdim, sms)
    out = [base]
    if M <= 8:
        bm = _next_pow2(M)
        for bn, bk, warps in ((32, 128, 4), (64, 128, 4), (64, 256, 4), (128, 256, 8),
                              (256, 128, 4)):
            cfg = LaunchConfig("gemv", bm, bn, bk, _auto_split(triton.cdiv(N, bn), Kdim // bk, sms),
                               warps)
            out += [cfg, replace(cfg, split_k=max(1, cfg.split_k // 2))]
    if M <= 64:
        bm = max(16, _next_pow2(M))
        for bn, bk, st, rs in ((64, 128, 3, False), (128, 128, 2, False), (64, 128, 4, True),
                               (128, 256, 3, True)):
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            out.append(LaunchConfig("dot", bm, bn, bk, _auto_split(tiles, Kdim // bk, sms), 4, st, rs))
    if M > 64:
        for bm, bn, warps, st in ((64, 128, 4, 4), (128, 128, 8, 4), (128, 64, 4, 4),
                                  (128, 256, 8, 3)):
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            cfg = LaunchConfig("dot", bm, bn, 64, 1, warps, st, True)
            out += [cfg, replace(cfg, split_k=_auto_split(tiles, Kdim // 64, sms))]
        out.append(LaunchConfig("dequant", block_n=128, block_k=32))
    return list(dict.fromkeys(out))  # unique, in order


class _Plan:
    """Everything one launch needs that does not depend on the input's data pointer."""

    def __init__(self, kw, M: int, cfg: LaunchConfig, has_bias: bool):
        self.cfg, self.M, self.has_bias = cfg, M, has_bias
        N, Kdim = kw.out_features, kw.in_features
        cb = kernel_container_bits(kw.bits)
        bk = cfg.block_k
        if kw.g_idx is not None:
            mode = 2
        else:
            mode = 0 if kw.group_size % bk == 0 and Kdim % bk == 0 else 1
        k_per_split = triton.cdiv(triton.cdiv(Kdim, cfg.split_k), bk) * bk
        self.split = triton.cdiv(Kdim, k_per_split)
        self.k_per_split = k_per_split
        common = dict(SPLIT_K=self.split, CB=cb, GROUP_MODE=mode, HAS_BIAS=has_bias,
                      num_warps=cfg.num_warps)
        if cfg.kind == "gemv":
            self.kernel = K._gemv_kernel
            self.grid = (triton.cdiv(N, cfg.block_n), self.split, triton.cdiv(M, cfg.block_m))
            self.meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KW=bk * cb // 32,
                             **common)
        elif cfg.kind == "dot":
            self.kernel = K._dot_kernel
            self.grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), self.split)
            self.meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=8,
                             RESHAPE=cfg.reshape, num_stages=cfg.num_stages, **common)
        else:
            self.kernel = K._dequant_kernel
            self.grid = (triton.cdiv(Kdim, bk), triton.cdiv(N, cfg.block_n))
            self.meta = dict(CB=cb, BLOCK_K=bk, BLOCK_N=cfg.block_n,
                             GROUP_MODE=2 if mode == 2 else 1, num_warps=4)
        self.reduce_grid = (triton.cdiv(M * N, 1024),)

    def run(self, x2: torch.Tensor, kw, bias: torch.Tensor | None) -> torch.Tensor:
        M, N, Kdim = self.M, kw.out_features, kw.in_features
        out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        gidx = kw.g_idx if kw.g_idx is not None else kw.words  # unused unless GROUP_MODE 2
        if self.cfg.kind == "dequant":
            w = torch.empty((Kdim, N), dtype=x2.dtype, device=x2.device)
            self.kernel[self.grid](kw.words, kw.scales, kw.zeros, gidx, w, N, Kdim,
                                   kw.group_size, **self.meta)
            return torch.addmm(bias, x2, w) if bias is not None else torch.matmul(x2, w, out=out)
        ws = out if self.split == 1 else torch.empty((self.split, M, N), dtype=torch.float32,
                                                     device=x2.device)
        b = bias if bias is not None else out
        self.kernel[self.grid](x2, kw.words, kw.scales, kw.zeros, gidx, b, out, ws, M, N, Kdim,
                               x2.stride(0), kw.group_size, self.k_per_split, **self.meta)
        if self.split > 1:
            K._splitk_reduce_kernel[self.reduce_grid](ws, b, out, M * N, N, self.split,
                                                      HAS_BIAS=self.has_bias, BLOCK=1024)
        return out


def _check_inputs(x: torch.Tensor, kw, bias: torch.Tensor | None) -> None:
    if x.device != kw.device:
        raise ValueError(f"quantized matmul: input is on {x.device} but the weight is on "
                         f"{kw.device}; move them to one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if x.dtype not in ACT_DTYPES or x.dtype != kw.dtype:
        raise TypeError(f"activations must be float16/bfloat16 matching the weight's "
                        f"{kw.dtype}, got {x.dtype}")
    if x.shape[-1] != kw.in_features:
        raise ValueError(f"input last dim {x.shape[-1]} != in_features {kw.in_features}")
    if bias is not None and (bias.device != x.device or bias.shape != (kw.out_features,)
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({kw.out_features},) tensor on {x.device}")


def _tune(kw, x2: torch.Tensor, bias, M: int, sms: int) -> LaunchConfig:
    best, best_ms = None, float("inf")
    for cfg in candidate_configs(M, kw.out_features, kw.in_features, sms):
        plan = _Plan(kw, M, cfg, bias is not None)
        try:
            ms = triton.testing.do_bench(lambda: plan.run(x2, kw, bias), warmup=5, rep=20,
                                         return_mode="median")
        except Exception:  # a config that does not fit this GPU (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best or default_config(M, kw.out_features, kw.in_features, sms)


def _plan_for(kw, x2: torch.Tensor, bias, config: LaunchConfig | None) -> _Plan:
    M = x2.shape[0]
    key = (M, bias is not None, config)
    plan = kw.plans.get(key)
    if plan is not None:
        return plan
    dkey = device_key(x2.device)
    sms = dkey[3] if len(dkey) > 1 else 4
    if config is None:
        tkey = (dkey, min(_next_pow2(M), 4096), kw.out_features, kw.in_features, kw.bits,
                kw.group_size, kw.g_idx is not None, x2.dtype, bias is not None)
        config = _TUNED.get(tkey)
        capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
        if config is None and _AUTOTUNE[0] and x2.is_cuda and not capturing:
            config = _TUNED[tkey] = _tune(kw, x2, bias, M, sms)
        if config is None:
            config = default_config(M, kw.out_features, kw.in_features, sms)
    plan = kw.plans[key] = _Plan(kw, M, config, bias is not None)
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
    # launches (and autotuning's timed launches, stream-capture check) go to the weight's
    # GPU even when another one is current (skip the switch, a few microseconds, when it
    # already is)
    switch = x2.is_cuda and x2.device.index != torch.cuda.current_device()
    ctx = torch.cuda.device(x2.device) if switch else contextlib.nullcontext()
    with ctx:
        plan = _plan_for(kw, x2, bias, config)
        y = plan.run(x2, kw, bias)
    return y.reshape(*lead, kw.out_features)
