"""THE definition of every on-disk integer layout layerquant reads or writes.

Everything else (exporters, loaders, Triton kernels, tests) imports from here, so a packing
order is written down exactly once.

Canonical in-memory form (`QuantizedWeight`): integer codes (out, in) in [0, 2^bits - 1],
per-group scales and zero points (out, n_groups), optional act-order `g_idx` (in,).
    W[o, i] = (codes[o, i] - zeros[o, g(i)]) * scales[o, g(i)],  g(i) = g_idx[i] or i // group_size

Layouts:
- AutoAWQ GEMM ("awq", version gemm): qweight int32 (in, out/8), each word holds 8 *output*
  channels in the interleaved nibble order AWQ_ORDER; qzeros int32 (in/G, out/8) same order,
  raw zero points; scales fp16 (in/G, out).
- GPTQ ("gptq"): qweight int32 (in*bits/32, out) packed sequentially along the *input* dim
  (value j of a word at bits j*b); qzeros int32 (in/G, out*bits/32) sequential along output;
  scales (in/G, out); g_idx int32 (in,). 3-bit packs 32 values into 3 words across word
  boundaries. Checkpoint format "gptq" stores zero-1 (the historic off-by-one), "gptq_v2" raw.
- compressed-tensors "pack-quantized": weight_packed int32 (out, in*bits/32) sequential along
  input; weight_scale (out, in/G); weight_zero_point int32 (out*bits/32, in/G) sequential along
  output (only when asymmetric); weight_shape int64 [out, in]; optional weight_g_idx (in,).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Nibble k of an AWQ word holds output column AWQ_ORDER[k] of its group of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# Weights per slice when dequantizing into another tensor (QuantizedWeight.dequantize_to):
# 64 MiB of float32; the planner counts two such slices.
DEQUANT_SLICE_ELEMENTS = 1 << 24


@dataclass
class QuantizedWeight:
    """One quantized linear weight in canonical form (see module docstring)."""

    codes: torch.Tensor  # uint8 / int (out, in)
    scales: torch.Tensor  # float (out, n_groups)
    zeros: torch.Tensor  # int (out, n_groups); symmetric schemes store the fixed mid-point
    bits: int
    group_size: int  # -1 = per output channel
    g_idx: torch.Tensor | None = None  # int32 (in,), act-order group of each input channel
    symmetric: bool = False

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.codes.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zero) * scale in `dtype`. Contiguous groups broadcast each group's scale
        and zero over its columns, in place in the one (out, in) result; only act-order's
        g_idx gathers them into (out, in) copies first. Same values either way."""
        if self.g_idx is not None:
            g = self.g_idx.long()
            return ((self.codes.to(dtype) - self.zeros.to(dtype)[:, g])
                    * self.scales.to(dtype)[:, g])
        out_f, in_f = self.codes.shape
        gs = in_f if self.group_size == -1 else self.group_size
        w = self.codes.to(dtype, copy=True).reshape(out_f, in_f // gs, gs)
        w.sub_(self.zeros.to(dtype).unsqueeze(-1)).mul_(self.scales.to(dtype).unsqueeze(-1))
        return w.reshape(out_f, in_f)

    def rows(self, r0: int, r1: int) -> "QuantizedWeight":
        """Output rows r0..r1 (views; g_idx is per input column, so shared)."""
        return QuantizedWeight(self.codes[r0:r1], self.scales[r0:r1], self.zeros[r0:r1],
                               self.bits, self.group_size, self.g_idx, self.symmetric)

    def row_steps(self, elements: int = DEQUANT_SLICE_ELEMENTS):
        """(r0, r1) row ranges of at most `elements` weights each."""
        step = max(1, elements // max(1, self.in_features))
        return [(r0, min(r0 + step, self.out_features))
                for r0 in range(0, self.out_features, step)]

    def dequantize_to(self, dest: torch.Tensor,
                      elements: int = DEQUANT_SLICE_ELEMENTS) -> torch.Tensor:
        """dest <- dequantize(float32) in dest's dtype and device, a slice of rows at a time:
        the float32 temporaries stay a slice (whole, a 8192×28672 weight costs 0.9 GiB per
        float32 copy, which is what ran an 8 GiB budget out of memory)."""
        for r0, r1 in self.row_steps(elements):
            dest[r0:r1].copy_(self.rows(r0, r1).dequantize(torch.float32))
        return dest

    def storage_bits(self) -> int:
        """Bits on disk: codes + fp16 scales + packed zeros (+ g_idx when present)."""
        n_groups = self.scales.shape[1]
        total = self.codes.numel() * self.bits + self.scales.numel() * 16
        if not self.symmetric:
            total += self.out_features * n_groups * self.bits
        if self.g_idx is not None:
            total += self.in_features * 32
        return total


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    # meta tensors (the export's layout planned from stand-ins) have shapes, not values
    if codes.numel() and not codes.is_meta and (int(codes.min()) < 0 or
                                                int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")


# ----------------------------------------------------------------------------------------
# Sequential packing along one dimension (GPTQ, compressed-tensors): value j -> bits j*b.
# ----------------------------------------------------------------------------------------
def pack_sequential(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes along `dim` into int32 words, value j of a run at bit offset j*bits
    (a slice of the other dimension at a time: see _by_slices).

    For bits that do not divide 32 (3, 5, 6, 7) values straddle word boundaries: the run of
    32 values fills `bits` words exactly, as GPTQ's 3-bit layout does. Vectorised over runs of
    32 values (32 shift-or steps whatever the length), so packing a 28672-wide weight on a GPU
    is a few dozen kernel launches, not tens of thousands."""
    _check_codes(codes, bits)
    return _by_slices(_pack_sequential, codes, 1 - dim % 2, bits, dim)


def _pack_sequential(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    x = codes.movedim(dim, 0).to(torch.int64)
    n = x.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    n_words = n * bits // 32
    flat = x.reshape(n, -1)
    run = 32 // bits if 32 % bits == 0 else 32  # values per run
    words_per_run = run * bits // 32
    n_runs = -(-n // run)
    if n_runs * run != n:  # a partial last run: zero values after n leave words < n_words as is
        flat = torch.cat([flat, flat.new_zeros((n_runs * run - n, flat.shape[1]))])
    runs = flat.reshape(n_runs, run, -1)
    out = torch.zeros((n_runs, words_per_run, flat.shape[1]), dtype=torch.int64,
                      device=codes.device)
    for j in range(run):
        w, off = divmod(j * bits, 32)
        out[:, w] |= (runs[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word
            out[:, w + 1] |= runs[:, j] >> (32 - off)
    out = _to_int32(out.reshape(n_runs * words_per_run, -1)[:n_words])
    return out.reshape((n_words,) + x.shape[1:]).movedim(0, dim).contiguous()


def unpack_sequential(packed: torch.Tensor, bits: int, dim: int, size: int,
                      dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of pack_sequential: `size` codes along `dim`, as `dtype`."""
    return _by_slices(_unpack_sequential, packed, 1 - dim % 2, bits, dim, size, dtype=dtype)


def _unpack_sequential(packed: torch.Tensor, bits: int, dim: int, size: int) -> torch.Tensor:
    x = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    flat = x.reshape(x.shape[0], -1)
    mask = (1 << bits) - 1
    run = 32 // bits if 32 % bits == 0 else 32
    words_per_run = run * bits // 32
    n_runs = -(-size // run)
    need = n_runs * words_per_run
    if flat.shape[0] < need:  # densely packed ragged tail (compressed-tensors): zero-extend
        flat = torch.cat([flat, flat.new_zeros((need - flat.shape[0], flat.shape[1]))])
    words = flat[:need].reshape(n_runs, words_per_run, -1)
    out = torch.empty((n_runs, run, flat.shape[1]), dtype=torch.int64, device=packed.device)
    for j in range(run):
        w, off = divmod(j * bits, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        out[:, j] = v & mask
    out = out.reshape(n_runs * run, -1)[:size]
    return out.to(torch.int32).reshape((size,) + x.shape[1:]).movedim(0, dim).contiguous()


# Elements per slice when packing or unpacking: the int64 temporaries stay 128 MiB each (whole,
# a 8192×28672 weight takes 1.8 GiB per int64 copy, more than an 8 GiB budget has to spare).
PACK_SLICE_ELEMENTS = 1 << 24


def _by_slices(fn, x: torch.Tensor, along: int, *args, dtype: torch.dtype | None = None):
    """fn(x, *args) for a 2-D x whose dimension `along` fn treats element by element:
    computed a slice along it at a time (each result cast to `dtype` if given) and
    concatenated, so the same result with a slice's worth of temporaries."""
    n = x.shape[along]
    step = max(1, PACK_SLICE_ELEMENTS // max(1, x.numel() // max(n, 1)))
    parts = []
    for i in range(0, n, step):
        part = fn(x.narrow(along, i, min(step, n - i)), *args)
        parts.append(part if dtype is None else part.to(dtype))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=along)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


# ----------------------------------------------------------------------------------------
# AutoAWQ GEMM: 4-bit only, 8 output channels per word in AWQ_ORDER.
# ----------------------------------------------------------------------------------------
def pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit codes -> (rows, cols/8) int32, nibble k = column AWQ_ORDER[k]."""
    _check_codes(intweight, 4)
    if intweight.shape[1] % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 output channels, got "
                         f"{intweight.shape[1]}")
    return _by_slices(_pack_awq, intweight, 0)


def _pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    rows, cols = intweight.shape
    x = intweight.to(torch.int64).reshape(rows, cols // 8, 8)
    out = torch.zeros((rows, cols // 8), dtype=torch.int64, device=intweight.device)
    for k, c in enumerate(AWQ_ORDER):
        out |= x[:, :, c] << (4 * k)
    return _to_int32(out)


def unpack_awq(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """(rows, cols/8) int32 -> (rows, cols) codes (as `dtype`) in natural column order."""
    return _by_slices(_unpack_awq, packed, 0, dtype=dtype)


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    x = packed.to(torch.int64) & 0xFFFFFFFF
    rows, words = x.shape
    out = torch.empty((rows, words, 8), dtype=torch.int64, device=packed.device)
    for k, c in enumerate(AWQ_ORDER):
        out[:, :, c] = (x >> (4 * k)) & 0xF
    return out.reshape(rows, words * 8).to(torch.int32)


def awq_pack_linear(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Canonical -> AutoAWQ GEMM tensors {qweight, qzeros, scales} (scales fp16)."""
    if q.bits != 4:
        raise ValueError(f"the AWQ GEMM layout holds 4-bit weights only (got {q.bits}-bit); "
                         "use the GPTQ or compressed-tensors export")
    if q.g_idx is not None:
        raise ValueError("the AWQ GEMM layout has no g_idx: act-order needs the GPTQ export")
    return {
        "qweight": pack_awq(q.codes.t().contiguous()),
        "qzeros": pack_awq(q.zeros.t().contiguous()),
        "scales": q.scales.t().contiguous().to(torch.float16),
    }


def awq_unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int) -> QuantizedWeight:
    codes = unpack_awq(qweight, torch.uint8).t().contiguous()
    zeros = unpack_awq(qzeros).t().contiguous()
    return QuantizedWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=4,
                           group_size=group_size)


# ----------------------------------------------------------------------------------------
# GPTQ (qweight sequential along input, qzeros sequential along output).
# ----------------------------------------------------------------------------------------
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _gptq_stored_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str, to_disk: bool):
    """"gptq" (v1) stores zero-1; we wrap modulo 2^bits so a zero point of 0 round-trips here
    (other v1 readers would read it as 2^bits, so exporters should avoid zero 0 for v1)."""
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")
    if checkpoint_format == "gptq_v2":
        return zeros
    mask = (1 << bits) - 1
    return ((zeros.to(torch.int64) + (-1 if to_disk else 1)) & mask).to(torch.int32)


def gptq_pack_linear(q: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Canonical -> GPTQ tensors {qweight, qzeros, scales, g_idx} (scales fp16)."""
    n_groups = q.scales.shape[1]
    g_idx = q.group_index().to(torch.int32)
    zeros = _gptq_stored_zeros(q.zeros, q.bits, checkpoint_format, to_disk=True)
    return {
        "qweight": pack_sequential(q.codes.t().contiguous(), q.bits, dim=0),
        "qzeros": pack_sequential(zeros.t().contiguous().reshape(n_groups, -1), q.bits, dim=1),
        "scales": q.scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.contiguous(),
    }


def gptq_unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       g_idx: torch.Tensor | None, bits: int, group_size: int,
                       checkpoint_format: str = "gptq") -> QuantizedWeight:
    """GPTQ tensors -> canonical. A g_idx equal to arange(in) // group_size is dropped."""
    in_features = qweight.shape[0] * 32 // bits
    out_features = qweight.shape[1]
    codes = unpack_sequential(qweight, bits, dim=0, size=in_features,
                              dtype=torch.uint8).t().contiguous()
    zeros = unpack_sequential(qzeros, bits, dim=1, size=out_features)
    zeros = _gptq_stored_zeros(zeros, bits, checkpoint_format, to_disk=False).t().contiguous()
    gs = in_features if group_size == -1 else group_size
    if g_idx is not None:
        trivial = torch.arange(in_features, device=g_idx.device) // gs
        g_idx = None if torch.equal(g_idx.long(), trivial) else g_idx.to(torch.int32)
    return QuantizedWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=bits,
                           group_size=group_size, g_idx=g_idx)


# ----------------------------------------------------------------------------------------
# compressed-tensors "pack-quantized" (weight_packed sequential along input).
# Stored nibble = canonical code (CT's signed value + 2^(bits-1) offset is the same number
# when the canonical zero point is the mid-point 2^(bits-1), as symmetric schemes use).
# ----------------------------------------------------------------------------------------
def ct_pack_linear(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Canonical -> {weight_packed, weight_scale, [weight_zero_point], weight_shape,
    [weight_g_idx]}; the zero point is stored only for asymmetric weights."""
    out = {
        "weight_packed": pack_sequential(q.codes.contiguous(), q.bits, dim=1),
        "weight_scale": q.scales.contiguous().to(torch.float16),
        "weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64),
    }
    if not q.symmetric:
        out["weight_zero_point"] = pack_sequential(q.zeros.contiguous(), q.bits, dim=0)
    if q.g_idx is not None:
        out["weight_g_idx"] = q.g_idx.to(torch.int32).contiguous()
    return out


def ct_unpack_linear(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     weight_shape: torch.Tensor | tuple[int, int], bits: int, group_size: int,
                     weight_zero_point: torch.Tensor | None = None,
                     weight_g_idx: torch.Tensor | None = None) -> QuantizedWeight:
    out_features, in_features = (int(v) for v in weight_shape)
    codes = unpack_sequential(weight_packed, bits, dim=1, size=in_features, dtype=torch.uint8)
    n_groups = weight_scale.shape[1]
    if weight_zero_point is None:
        zeros = torch.full((out_features, n_groups), 1 << (bits - 1), dtype=torch.int32,
                           device=weight_packed.device)
    else:
        zeros = unpack_sequential(weight_zero_point, bits, dim=0, size=out_features)
    return QuantizedWeight(codes=codes, scales=weight_scale.contiguous(), zeros=zeros, bits=bits,
                           group_size=group_size, g_idx=weight_g_idx,
                           symmetric=weight_zero_point is None)


# ----------------------------------------------------------------------------------------
# Kernel layout (in memory only, built once at load by QuantLinear; never written to disk).
# Codes stay (out, in) row-major and are packed along the *input* dim into int32 words of
# PW = 32 / cb values, where the container width cb is 2, 4 or 8 (3-bit codes sit in 4-bit
# containers, 5..7-bit in 8-bit ones). Inputs are taken in blocks of KB = BW * PW; a block is
# split into PW "planes" of BW consecutive inputs, and word w of a row holds, in value slot j
# (bits j*cb), input
#     k(w, j) = (w // BW) * KB + j * BW + w % BW.
# With KB = the group size, every word lies in one group and a run of words read as value
# slot j meets a run of *consecutive* inputs, so a GEMV loads its activations as plain
# vectors, applies one zero point per word run and needs no per-value shifts of the
# activations (kernels/triton_w4a16.py).
# ----------------------------------------------------------------------------------------
def kernel_container_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def kernel_plane_words(bits: int, group_size: int, in_features: int) -> int:
    """BW: words per plane run. One block per group (KB = group size) when the group splits
    into whole planes, else BW = 1 (each word holds PW consecutive inputs)."""
    per_word = 32 // kernel_container_bits(bits)
    gs = in_features if group_size == -1 else group_size
    return gs // per_word if gs % per_word == 0 and in_features % gs == 0 else 1


def kernel_input_order(in_features: int, bits: int, block_words: int) -> torch.Tensor:
    """(in,) int64: position p = w * PW + j of the kernel layout holds input order[p]."""
    per_word = 32 // kernel_container_bits(bits)
    kb = block_words * per_word
    if in_features % kb:
        raise ValueError(f"in_features={in_features} is not a multiple of the kernel block {kb}")
    w = torch.arange(in_features // per_word).view(-1, 1)
    j = torch.arange(per_word).view(1, -1)
    return ((w // block_words) * kb + j * block_words + w % block_words).reshape(-1)


def pack_kernel(codes_out_in: torch.Tensor, bits: int, block_words: int = 1) -> torch.Tensor:
    """(out, in) codes -> (out, in * cb / 32) int32 words of the kernel layout (vectorised)."""
    _check_codes(codes_out_in, bits)
    cb = kernel_container_bits(bits)
    per_word = 32 // cb
    out_f, in_f = codes_out_in.shape
    if in_f % per_word:
        raise ValueError(f"in_features={in_f} is not a multiple of {per_word} ({bits}-bit)")
    order = kernel_input_order(in_f, bits, block_words).to(codes_out_in.device)
    x = codes_out_in.index_select(1, order).to(torch.int64).reshape(out_f, in_f // per_word,
                                                                      per_word)
    shifts = (torch.arange(per_word, device=x.device) * cb).view(1, 1, per_word)
    return _to_int32((x << shifts).sum(dim=2))


def unpack_kernel(words: torch.Tensor, bits: int, block_words: int = 1) -> torch.Tensor:
    """(out, in * cb / 32) int32 words -> (out, in) int32 codes in natural input order."""
    cb = kernel_container_bits(bits)
    per_word = 32 // cb
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * cb
    vals = (words.unsqueeze(2) >> shifts.view(1, 1, per_word)) & ((1 << cb) - 1)
    out_f, n_words = words.shape
    order = kernel_input_order(n_words * per_word, bits, block_words).to(words.device)
    out = torch.empty((out_f, n_words * per_word), dtype=torch.int32, device=words.device)
    out[:, order] = vals.reshape(out_f, -1)
    return out
