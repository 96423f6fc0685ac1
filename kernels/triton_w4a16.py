"""Fused dequantize + matmul Triton kernels over the kernel layout of kernels/packing.py.

Weight: words (K*cb/32, N) int32, value j of a word = input row (word*32/cb + j) at bits j*cb;
scales/zeros (n_groups, N) in the activation dtype; W[k, n] = (code - zero) * scale.

Three kernels, chosen per call by kernels/triton_dispatch.py (`quant_matmul`):
- `_gemv_kernel` (M <= 8; BLOCK_M rows per program share one weight read): CUDA-core dot products in fp32; when a K-tile lies
  inside one group it sums x*code and x once and applies scale/zero per tile, not per weight.
- `_dot_kernel` (tensor cores): dequantizes a (BLOCK_K, BLOCK_N) tile in registers into the
  activation dtype and feeds tl.dot with an fp32 accumulator.
- `_dequant_kernel`: writes the dense (K, N) weight once, for large M where cuBLAS wins.
Split-K writes fp32 partials to a workspace that `_splitk_reduce_kernel` sums in a fixed
order (deterministic; no atomics), adding the bias and casting.

GROUP_MODE: 0 = every K-tile inside one group (scale row k0 // G); 1 = group k // G per row;
2 = group read from g_idx per row (act-order that could not be made contiguous).
This module decorates kernels at import: set TRITON_INTERPRET=1 before importing it to run
them on CPU.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_group_params(s_ptr, z_ptr, gidx_ptr, ks, k0, offs_n, mask_kn, N, G,
                       GROUP_MODE: tl.constexpr):
    """Scales and zeros broadcastable against a (.., BLOCK_N) tile whose rows are `ks`."""
    if GROUP_MODE == 0:
        g = k0 // G
        s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
    else:
        if GROUP_MODE == 1:
            g = ks // G
        else:
            g = tl.load(gidx_ptr + ks)  # callers clamp rows past K to 0
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_kn, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_kn, other=0.0)
    return s, z


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr, ws_ptr,
                 M, N, K, stride_xm, G, K_PER_SPLIT,
                 SPLIT_K, CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """BLOCK_M (1..8) activation rows share each unpacked weight tile (one HBM read)."""
    PER_WORD: tl.constexpr = 32 // CB
    BLOCK_K: tl.constexpr = BLOCK_KW * PER_WORD
    MASK: tl.constexpr = (1 << CB) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    offs_j = tl.arange(0, PER_WORD)
    shifts = (offs_j * CB)[None, :, None]
    n_words = K // PER_WORD
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_rows = k0 // PER_WORD + offs_w
        words = tl.load(w_ptr + w_rows[:, None] * N + offs_n[None, :],
                        mask=(w_rows[:, None] < n_words) & mask_n[None, :], other=0)
        codes = ((words[:, None, :] >> shifts) & MASK).to(tl.float32)  # (KW, PW, N)
        ks = k0 + offs_w[:, None] * PER_WORD + offs_j[None, :]  # (KW, PW)
        if GROUP_MODE == 0:
            s, z = _load_group_params(s_ptr, z_ptr, gidx_ptr, ks, k0, offs_n, mask_n, N, G,
                                      GROUP_MODE)
            s = s.to(tl.float32)
            z = z.to(tl.float32)
            w = codes
        else:
            ks3 = ks[:, :, None]
            s, z = _load_group_params(s_ptr, z_ptr, gidx_ptr, tl.where(ks3 < K, ks3, 0), k0,
                                      offs_n[None, None, :], (ks3 < K) & mask_n[None, None, :],
                                      N, G, GROUP_MODE)
            w = (codes - z.to(tl.float32)) * s.to(tl.float32)
        for mm in tl.static_range(BLOCK_M):
            m = row0 + mm
            k_lim = tl.where(m < M, K, 0)  # rows past M read nothing
            xk = tl.load(x_ptr + m * stride_xm + ks, mask=ks < k_lim, other=0.0).to(tl.float32)
            xw = tl.sum(tl.sum(xk[:, :, None] * w, axis=1), axis=0)
            if GROUP_MODE == 0:  # tile inside one group: scale/zero once per tile
                xw = s * (xw - z * tl.sum(tl.sum(xk, axis=1), axis=0))
            if BLOCK_M == 1:
                acc += xw[None, :]
            else:
                acc = tl.where((tl.arange(0, BLOCK_M) == mm)[:, None], acc + xw[None, :], acc)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr, ws_ptr,
                M, N, K, stride_xm, G, K_PER_SPLIT, SPLIT_K,
                CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GROUP_MODE: tl.constexpr,
                HAS_BIAS: tl.constexpr, RESHAPE: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // CB
    MASK: tl.constexpr = (1 << CB) - 1
    dt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row-blocks share each weight column-block in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if RESHAPE:
            # load each word once, unpack to (KW, PER_WORD, N) and merge the first two dims
            w_rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            words = tl.load(w_ptr + w_rows[:, None] * N + offs_n[None, :],
                            mask=(w_rows < K // PER_WORD)[:, None] & mask_n[None, :], other=0)
            shifts = (tl.arange(0, PER_WORD) * CB)[None, :, None]
            codes = tl.reshape((words[:, None, :] >> shifts) & MASK, (BLOCK_K, BLOCK_N))
        else:
            # each word is read PER_WORD times from one address (an L1 hit), which keeps the
            # tile in the (BLOCK_K, BLOCK_N) shape tl.dot wants without a reshape
            words = tl.load(w_ptr + (ks // PER_WORD)[:, None] * N + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0)
            codes = (words >> ((ks % PER_WORD) * CB)[:, None]) & MASK
        if GROUP_MODE == 0:
            s, z = _load_group_params(s_ptr, z_ptr, gidx_ptr, ks, k0, offs_n, mask_n, N, G, GROUP_MODE)
            w = (codes.to(dt) - z[None, :]) * s[None, :]
        else:
            s, z = _load_group_params(s_ptr, z_ptr, gidx_ptr, tl.where(mask_k, ks, 0)[:, None],
                                      k0, offs_n[None, :], mask_k[:, None] & mask_n[None, :],
                                      N, G, GROUP_MODE)
            w = (codes.to(dt) - z) * s
        acc = tl.dot(a, w, acc)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(dt),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: bitwise reproducible
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, K, G,
                    CB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_MODE: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // CB
    MASK: tl.constexpr = (1 << CB) - 1
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (ks < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(w_ptr + (ks // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    codes = (words >> ((ks % PER_WORD) * CB)[:, None]) & MASK
    s, z = _load_group_params(s_ptr, z_ptr, gidx_ptr, tl.where(ks < K, ks, 0)[:, None], 0,
                              offs_n[None, :], mask, N, G, GROUP_MODE)  # 1 or 2 here
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + ks[:, None] * N + offs_n[None, :], (codes.to(dt) - z) * s, mask=mask)
