"""Fused dequantize + matmul Triton kernels over the kernel layout of kernels/packing.py.

Weight: words (N, K*cb/32) int32 in the "planes" order of `packing.pack_kernel` (value slot j
of word w of a row holds input (w // BW) * KB + j * BW + w % BW, KB = BW * PW); scales and
zeros (n_groups, N) in the activation dtype; W[n, k] = (code - zero) * scale.

Integer -> float without a conversion instruction (`_plane`): a value at bits p..p+cb-1 of a
word, masked in place and OR-ed into the float32 2^(23-p) (exponent 150-p), reads as
2^(23-p) + code exactly, because bit p of that float's mantissa weighs exactly 1; subtracting
(2^(23-p) + zero), a per-group constant, gives code - zero exactly. So each weight costs one
and-or (LOP3), one float subtract and its FMA (plus one shift per word for the values above
bit 23). The first version's shift + mask + I2F ran the conversion at a quarter of the FMA
rate and bounded the GEMV.

Kernels, chosen per call by kernels/triton_dispatch.py:
- `_gemv_kernel` (CUDA cores; BLOCK_M <= 4 rows share each weight read). Value slot j of a
  run of BLOCK_KW words meets BLOCK_KW consecutive inputs, so its activations load as one
  vector; when a run lies in one group (GROUP_MODE 0) the scale is applied once per run.
- `_dot_kernel` (tensor cores): unpacks a (BLOCK_N, BLOCK_KW * PW) tile with `tl.join` (the
  values of a word stay in the thread that loaded it), gathers the activations in the same
  order, and calls tl.dot, either x @ W^T or, for small M, (W @ x^T)^T (SWAP) so that the
  weight tile fills the MMA's 64-row side.
- `_dequant_kernel`: writes the dense (N, K) weight once, for large M where cuBLAS wins.
Split-K: every split writes an fp32 partial; the last program to finish a tile (an atomic
counter per tile, reset by that program) sums the partials in split order (deterministic,
no second launch), adds the bias and casts.

GROUP_MODE: 0 = each run of BLOCK_KW words inside one group (KB == G and BLOCK_KW | BW);
1 = group k // G per value; 2 = group read from g_idx per value (act-order that could not be
made contiguous). This module decorates kernels at import: set TRITON_INTERPRET=1 before
importing it to run them on CPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _plane(words, words_hi, vmask, J: tl.constexpr, CB: tl.constexpr, zero):
    """float32 code - zero of value slot J of int32 `words` (words_hi = words >> 16), exact.
    `zero` is float32, one per row (1-D) or broadcastable against words. `vmask` is
    (1 << CB) - 1 passed at run time: as a register operand, each slot is one LOP3 with the
    exponent as its immediate (as two immediates, ptxas re-materialises the mask with a MOV
    per value)."""
    P: tl.constexpr = J * CB
    if P + CB <= 23:  # in place: exponent 150 - P makes bit P weigh 1
        EXP_LO: tl.constexpr = 150 - P
        v = (words & (vmask << P)) | (EXP_LO << 23)
        off = tl.full((), EXP_LO << 23, tl.int32).to(tl.float32, bitcast=True)
    else:  # bits above 23 come from the word shifted down by 16
        EXP_HI: tl.constexpr = 166 - P
        v = (words_hi & (vmask << (P - 16))) | (EXP_HI << 23)
        off = tl.full((), EXP_HI << 23, tl.int32).to(tl.float32, bitcast=True)
    if len(zero.shape) == 1:  # one zero per row
        return v.to(tl.float32, bitcast=True) - (zero + off)[:, None]
    else:
        return v.to(tl.float32, bitcast=True) - (zero + off)


@triton.jit
def _slot_inputs(ws, j, BW: tl.constexpr, PW: tl.constexpr):
    """Input index of value slot j of words ws."""
    return (ws // BW) * (BW * PW) + j * BW + ws % BW


@triton.jit
def _group_of(ks, gidx_ptr, G, GROUP_MODE: tl.constexpr):
    if GROUP_MODE == 1:
        return ks // G
    else:
        return tl.load(gidx_ptr + ks)  # callers clamp inputs past K to 0


@triton.jit
def _group_params(s_ptr, z_ptr, gidx_ptr, ks, kin, offs_n, mask_n, N, G,
                  GROUP_MODE: tl.constexpr):
    """(BLOCK_N, len(ks)) float32 zeros and scales of weights (offs_n, ks), one group each."""
    g = _group_of(tl.where(kin, ks, 0), gidx_ptr, G, GROUP_MODE)
    pm = mask_n[:, None] & kin[None, :]
    z = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=pm, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=pm, other=0.0).to(tl.float32)
    return z, s


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr, tile, pid_k,
              n_splits, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the (BLOCK_M, BLOCK_N) fp32 tile, or its split-K partial; the last split of a
    tile to finish sums all partials in split order and stores the result."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        MN = M * N
        tl.store(ws_ptr + pid_k * MN + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the count moves
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            total = tl.zeros_like(acc)
            for s in range(n_splits):  # fixed order: bitwise reproducible
                total += tl.load(ws_ptr + s * MN + offs_m[:, None] * N + offs_n[None, :],
                                 mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=offs_n < N,
                                 other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call (or graph replay)


@triton.jit
def _row_ptrs(x_ptr, row0, stride_xm, M, offs_w):
    """The 4 activation rows from row0 and whether each is live (rows past M load zeros; the
    masks are tensors, shaped like offs_w, because the interpreter rejects a scalar-and-tensor
    mask)."""
    x0 = x_ptr + row0 * stride_xm
    x1 = x0 + stride_xm
    x2 = x1 + stride_xm
    x3 = x2 + stride_xm
    live0 = (offs_w * 0 + row0) < M
    live1 = (offs_w * 0 + row0 + 1) < M
    live2 = (offs_w * 0 + row0 + 2) < M
    live3 = (offs_w * 0 + row0 + 3) < M
    return x0, x1, x2, x3, live0, live1, live2, live3


@triton.jit
def _run_params(s_ptr, z_ptr, g, offs_n, mask_n, N):
    """Group g's float32 zero (BLOCK_N,) and scale (BLOCK_N, 1) per row (two small layout
    conversions per run: loading them as (BLOCK_N, 1) tiles instead drags the whole run into
    their layout)."""
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    return z, s


@triton.jit
def _gemv_run(words, words_hi, z, w0, offs_w, x0, x1, x2, x3, live0, live1, live2, live3,
              vmask, CB: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Σ over the value slots of one run in one group: x · (code - zero) per row, unscaled."""
    PW: tl.constexpr = 32 // CB
    p0 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    p1 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    p3 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    for j in tl.static_range(PW):
        ks = _slot_inputs(w0, j, BW, PW) + offs_w  # consecutive inputs
        d = _plane(words, words_hi, vmask, j, CB, z)  # code - zero, exact
        p0 += tl.load(x0 + ks, mask=live0, other=0.0).to(tl.float32)[None, :] * d
        if BLOCK_M > 1:
            p1 += tl.load(x1 + ks, mask=live1, other=0.0).to(tl.float32)[None, :] * d
        if BLOCK_M > 2:
            p2 += tl.load(x2 + ks, mask=live2, other=0.0).to(tl.float32)[None, :] * d
            p3 += tl.load(x3 + ks, mask=live3, other=0.0).to(tl.float32)[None, :] * d
    return p0, p1, p2, p3


@triton.jit
def _gemv_whole_runs(w_ptr, s_ptr, z_ptr, x0, x1, x2, x3, live0, live1, live2, live3,
                     offs_n, mask_n, offs_w, N, KP, w_start, w_end, vmask,
                     CB: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, PREFETCH: tl.constexpr):
    """GROUP_MODE 0: whole runs, no input tail, one group per run: the scale applied once
    per run. Returns the 4 rows' element-wise accumulators."""
    acc0 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    w_ptrs = w_ptr + offs_n[:, None] * KP + offs_w[None, :]
    words = tl.load(w_ptrs + w_start, mask=mask_n[:, None], other=0)
    for w0 in range(w_start, w_end, BLOCK_KW):
        if PREFETCH:  # next run's words in flight while this run computes
            more = (offs_w * 0 + w0 + BLOCK_KW) < w_end
            nxt = tl.load(w_ptrs + (w0 + BLOCK_KW), mask=mask_n[:, None] & more[None, :],
                          other=0)
        else:
            words = tl.load(w_ptrs + w0, mask=mask_n[:, None], other=0)
        g = w0 // BW
        words_hi = words >> 16
        z, s = _run_params(s_ptr, z_ptr, g, offs_n, mask_n, N)
        p0, p1, p2, p3 = _gemv_run(words, words_hi, z, w0, offs_w, x0, x1, x2, x3, live0,
                                   live1, live2, live3, vmask, CB, BW, BLOCK_M, BLOCK_N,
                                   BLOCK_KW)
        acc0 += s * p0
        if BLOCK_M > 1:
            acc1 += s * p1
        if BLOCK_M > 2:
            acc2 += s * p2
            acc3 += s * p3
        if PREFETCH:
            words = nxt
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_any_runs(w_ptr, s_ptr, z_ptr, gidx_ptr, x0, x1, x2, x3, live0, live1, live2, live3,
                   offs_n, mask_n, offs_w, N, K, KP, G, w_start, w_end, vmask,
                   CB: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_MODE: tl.constexpr):
    """GROUP_MODE 1/2: a group per value, inputs past K masked. Returns the 4 rows'
    element-wise accumulators."""
    PW: tl.constexpr = 32 // CB
    acc0 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    for w0 in range(w_start, w_end, BLOCK_KW):
        ws = w0 + offs_w
        words = tl.load(w_ptr + offs_n[:, None] * KP + ws[None, :],
                        mask=mask_n[:, None] & (ws < KP)[None, :], other=0)
        words_hi = words >> 16
        for j in tl.static_range(PW):
            ks = _slot_inputs(ws, j, BW, PW)
            kin = ks < K
            z, s = _group_params(s_ptr, z_ptr, gidx_ptr, ks, kin, offs_n, mask_n, N, G,
                                 GROUP_MODE)
            d = _plane(words, words_hi, vmask, j, CB, z) * s
            xr = tl.load(x0 + ks, mask=kin & live0, other=0.0).to(tl.float32)
            acc0 += xr[None, :] * d
            if BLOCK_M > 1:
                xr = tl.load(x1 + ks, mask=kin & live1, other=0.0).to(tl.float32)
                acc1 += xr[None, :] * d
            if BLOCK_M > 2:
                xr = tl.load(x2 + ks, mask=kin & live2, other=0.0).to(tl.float32)
                acc2 += xr[None, :] * d
                xr = tl.load(x3 + ks, mask=kin & live3, other=0.0).to(tl.float32)
                acc3 += xr[None, :] * d
    return acc0, acc1, acc2, acc3


@triton.jit
def _rows_of(acc0, acc1, acc2, acc3, BLOCK_M: tl.constexpr):
    """(BLOCK_M, BLOCK_N) result: row r of the block is the sum over words of acc_r."""
    rows = tl.arange(0, BLOCK_M)[:, None]
    out = tl.where(rows == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if BLOCK_M > 1:
        out = tl.where(rows == 1, tl.sum(acc1, axis=1)[None, :], out)
    if BLOCK_M > 2:
        out = tl.where(rows == 2, tl.sum(acc2, axis=1)[None, :], out)
        out = tl.where(rows == 3, tl.sum(acc3, axis=1)[None, :], out)
    return out


@triton.jit(do_not_specialize=["M", "n_splits"])  # one compile for every M and split count
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KP, stride_xm, G, W_PER_SPLIT, vmask, n_splits,
                 SPLIT: tl.constexpr, CB: tl.constexpr, BW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr):
    """Up to 4 activation rows (one accumulator each) share every unpacked weight; all
    tiles are (BLOCK_N, BLOCK_KW) in the layout of the word load (no layout conversions);
    the accumulators stay element-wise and are summed over the words once, at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    x0, x1, x2, x3, live0, live1, live2, live3 = _row_ptrs(x_ptr, row0, stride_xm, M, offs_w)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, KP)
    if GROUP_MODE == 0:
        acc0, acc1, acc2, acc3 = _gemv_whole_runs(
            w_ptr, s_ptr, z_ptr, x0, x1, x2, x3, live0, live1, live2, live3, offs_n, mask_n,
            offs_w, N, KP, w_start, w_end, vmask, CB, BW, BLOCK_M, BLOCK_N, BLOCK_KW, PREFETCH)
    else:
        acc0, acc1, acc2, acc3 = _gemv_any_runs(
            w_ptr, s_ptr, z_ptr, gidx_ptr, x0, x1, x2, x3, live0, live1, live2, live3, offs_n,
            mask_n, offs_w, N, K, KP, G, w_start, w_end, vmask, CB, BW, BLOCK_M, BLOCK_N,
            BLOCK_KW, GROUP_MODE)
    _epilogue(_rows_of(acc0, acc1, acc2, acc3, BLOCK_M), row0 + tl.arange(0, BLOCK_M), offs_n,
              M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
              tl.program_id(2) * tl.num_programs(0) + pid_n, pid_k, n_splits, SPLIT, HAS_BIAS)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` in grouped launch order: GROUP_M
    row-blocks share each weight column-block in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _dot_slot(acc, b, x_ptr, offs_m, mask_m, ks, kin, stride_xm, SWAP: tl.constexpr):
    """acc plus the activations at inputs ks times the dequantized weight tile b:
    x @ b^T, or (b @ x^T) into the transposed accumulator (SWAP)."""
    if SWAP:
        a_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None],
                      mask=mask_m[None, :] & kin[:, None], other=0.0)
        acc = tl.dot(b, a_t, acc)
    else:
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=mask_m[:, None] & kin[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit(do_not_specialize=["M", "n_splits"])
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                M, N, K, KP, stride_xm, G, W_PER_SPLIT, vmask, n_splits,
                SPLIT: tl.constexpr, CB: tl.constexpr, BW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                GROUP_M: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                SWAP: tl.constexpr):
    """Per run of BLOCK_KW words, one tl.dot per value slot: slot j of the run is a
    (BLOCK_N, BLOCK_KW) weight tile over BLOCK_KW consecutive inputs (no reshapes, no
    gathers), dequantized in registers to the activation dtype."""
    PW: tl.constexpr = 32 // CB
    dt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, KP)
    for w0 in range(w_start, w_end, BLOCK_KW):
        ws = w0 + offs_w
        words = tl.load(w_ptr + offs_n[:, None] * KP + ws[None, :],
                        mask=mask_n[:, None] & (ws < KP)[None, :], other=0)
        words_hi = words >> 16
        if GROUP_MODE == 0:
            z, s = _run_params(s_ptr, z_ptr, w0 // BW, offs_n, mask_n, N)
        for j in tl.static_range(PW):
            ks = _slot_inputs(ws, j, BW, PW)
            kin = ks < K
            if GROUP_MODE == 0:
                b = (_plane(words, words_hi, vmask, j, CB, z) * s).to(dt)
            else:
                zj, sj = _group_params(s_ptr, z_ptr, gidx_ptr, ks, kin, offs_n, mask_n, N, G,
                                       GROUP_MODE)
                b = (_plane(words, words_hi, vmask, j, CB, zj) * sj).to(dt)
            acc = _dot_slot(acc, b, x_ptr, offs_m, mask_m, ks, kin, stride_xm, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr, pid, pid_k,
              n_splits, SPLIT, HAS_BIAS)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, K, KP, G, vmask,
                    CB: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr, GROUP_MODE: tl.constexpr):
    """Dense (N, K) weight in out's dtype, rounded once from (code - zero) * scale."""
    PW: tl.constexpr = 32 // CB
    ws = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words = tl.load(w_ptr + offs_n[:, None] * KP + ws[None, :],
                    mask=mask_n[:, None] & (ws < KP)[None, :], other=0)
    dt = out_ptr.dtype.element_ty
    words_hi = words >> 16
    for j in tl.static_range(PW):
        ks = _slot_inputs(ws, j, BW, PW)
        kin = ks < K
        if GROUP_MODE == 0:  # KB == G: the word's block is its group
            g = ws // BW
            pm = mask_n[:, None] & kin[None, :]
            z = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=pm, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=pm, other=0.0).to(tl.float32)
        else:
            z, s = _group_params(s_ptr, z_ptr, gidx_ptr, ks, kin, offs_n, mask_n, N, G, GROUP_MODE)
        w = _plane(words, words_hi, vmask, j, CB, z) * s
        tl.store(out_ptr + offs_n[:, None] * K + ks[None, :], w.to(dt),
                 mask=mask_n[:, None] & kin[None, :])
