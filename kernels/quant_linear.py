"""QuantLinear: a linear layer holding one packed quantized weight in an on-disk layout.

Buffers carry exactly the tensor names, shapes and dtypes of the checkpoint layout, so a
module built with the right constructor arguments takes `load_state_dict(..., assign=True)`
straight from a shard. The first forward repacks them (once, cached) into the kernel layout
of kernels/packing.py (`pack_kernel`, the "planes" order) plus dense per-group scales and
zeros; the on-disk buffers stay untouched for state_dict(). On CPU, or without Triton, forward dequantizes + matmuls;
on CUDA it runs the fused Triton kernels of kernels/triton_w4a16.py (where triton, the
optional "gpu" extra, imports; without it every forward takes the CPU path).
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from quantizer.kernels import packing
from quantizer.kernels.packing import QuantizedWeight

triton_dispatch: ModuleType | None  # None without triton
try:
    import triton  # noqa: F401 -- optional (the "gpu" extra)
except Exception:  # noqa: BLE001 -- absent, or an install that does not import
    triton_dispatch = None
else:
    from quantizer.kernels import triton_dispatch

LAYOUTS = ("awq", "gptq", "compressed-tensors")


def _n_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features={in_features}")
    return in_features // group_size


class KernelWeight:
    """The cached kernel-side form of one QuantLinear weight on one device, made once at load.

    words: (N, K*cb/32) int32 in the "planes" layout of packing.pack_kernel (block_words =
    BW: one block per group where the group splits into whole planes); scales/zeros:
    (n_groups, N) in the activation dtype (zeros as floats: the kernels subtract them
    exactly); perm: input permutation that makes act-order groups contiguous (or None);
    g_idx: per-input group index when groups are not contiguous even after sorting.
    `extra` holds forms of other kernels (torch's tinygemm), built only where the dispatch
    chose them; `plans` the launch plans per (M, bias, config)."""

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        self.bits = q.bits
        self.in_features, self.out_features = q.in_features, q.out_features
        gs = q.in_features if q.group_size == -1 else q.group_size
        codes, g, self.perm, self.g_idx = q.codes, None, None, None
        if q.g_idx is not None:
            g = q.g_idx.long()
            perm = torch.argsort(g, stable=True)
            if torch.equal(g[perm], torch.arange(q.in_features, device=g.device) // gs):
                # act-order with equal-size groups: permute inputs once, then plain groups
                self.perm = perm.to(device)
                codes = codes[:, perm]
            else:
                self.g_idx = g.to(torch.int32).to(device)
        self.group_size = gs
        self.block_words = packing.kernel_plane_words(q.bits, gs, q.in_features)
        self.words = packing.pack_kernel(codes, q.bits, self.block_words).to(device)
        self.scales = q.scales.t().contiguous().to(device=device, dtype=dtype)
        self.zeros = q.zeros.t().contiguous().to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, self.words.device  # "cuda" -> "cuda:0"
        self.plans: dict = {}  # launch plans per (M, bias, config), see triton_dispatch
        self.extra: dict = {}  # other kernels' forms of this weight, see triton_dispatch

    def codes_nk(self) -> torch.Tensor:
        """(N, K) int32 codes in kernel input order (inputs already permuted by `perm`)."""
        return packing.unpack_kernel(self.words, self.bits, self.block_words)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(K, N) weight in kernel input order (inputs already permuted by `perm`)."""
        codes = self.codes_nk().t().to(dtype)
        if self.g_idx is not None:
            g = self.g_idx.long()
        else:
            g = torch.arange(self.in_features, device=self.words.device) // self.group_size
        return (codes - self.zeros.to(dtype)[g]) * self.scales.to(dtype)[g]


class QuantLinear(nn.Module):
    # Buffers (register_buffer in __init__), by layout. awq / gptq: qweight, qzeros, scales
    # (gptq: g_idx); compressed-tensors: weight_packed, weight_scale, weight_shape (optional:
    # weight_zero_point, weight_g_idx).
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 128, layout: str = "awq", bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None,
                 checkpoint_format: str = "gptq", symmetric: bool = False,
                 act_order: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if bits not in packing.SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {packing.SUPPORTED_BITS}, got {bits}")
        if layout == "awq" and bits != 4:
            raise ValueError("the AWQ GEMM layout holds 4-bit weights only")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.layout = bits, group_size, layout
        self.checkpoint_format, self.symmetric = checkpoint_format, symmetric
        self.dtype = dtype
        ng = _n_groups(in_features, group_size)
        i32 = dict(dtype=torch.int32, device=device)
        words_in, words_out = in_features * bits // 32, out_features * bits // 32
        if layout == "awq":
            if out_features % 8:
                raise ValueError("AWQ needs out_features to be a multiple of 8")
            self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, **i32))
            self.register_buffer("qzeros", torch.zeros(ng, out_features // 8, **i32))
            self.register_buffer("scales", torch.zeros(ng, out_features, dtype=dtype, device=device))
        elif layout == "gptq":
            self._check_words(in_features, out_features, bits)
            self.register_buffer("qweight", torch.zeros(words_in, out_features, **i32))
            self.register_buffer("qzeros", torch.zeros(ng, words_out, **i32))
            self.register_buffer("scales", torch.zeros(ng, out_features, dtype=dtype, device=device))
            gs = in_features if group_size == -1 else group_size
            self.register_buffer("g_idx", (torch.arange(in_features, device=device) // gs).to(torch.int32))
        else:
            self._check_words(in_features, out_features if not symmetric else 32, bits)
            self.register_buffer("weight_packed", torch.zeros(out_features, words_in, **i32))
            self.register_buffer("weight_scale", torch.zeros(out_features, ng, dtype=dtype, device=device))
            if not symmetric:
                self.register_buffer("weight_zero_point", torch.zeros(words_out, ng, **i32))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features],
                                                              dtype=torch.int64, device=device))
            if act_order:
                self.register_buffer("weight_g_idx", torch.zeros(in_features, **i32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._kernel_cache: dict = {}

    @staticmethod
    def _check_words(in_features: int, out_features: int, bits: int) -> None:
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"{bits}-bit packing needs in/out features whose bit count is a "
                             f"multiple of 32 (got in={in_features}, out={out_features})")

    # ---- canonical form ------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, layout: str = "awq",
                       bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                       checkpoint_format: str = "gptq") -> "QuantLinear":
        m = cls(q.in_features, q.out_features, bits=q.bits, group_size=q.group_size,
                layout=layout, bias=bias is not None, dtype=dtype, device=q.codes.device,
                checkpoint_format=checkpoint_format, symmetric=q.symmetric,
                act_order=q.g_idx is not None)
        if layout == "awq":
            tensors = packing.awq_pack_linear(q)
        elif layout == "gptq":
            tensors = packing.gptq_pack_linear(q, checkpoint_format)
        else:
            tensors = packing.ct_pack_linear(q)
        for name, t in tensors.items():
            ref = getattr(m, name)
            setattr(m, name, t.to(device=ref.device, dtype=ref.dtype).contiguous())
        if bias is not None:
            m.bias = bias.detach().to(dtype).clone()
        return m

    def to_quantized(self) -> QuantizedWeight:
        if self.layout == "awq":
            return packing.awq_unpack_linear(self.qweight, self.qzeros, self.scales, self.group_size)
        if self.layout == "gptq":
            return packing.gptq_unpack_linear(self.qweight, self.qzeros, self.scales, self.g_idx,
                                              self.bits, self.group_size, self.checkpoint_format)
        return packing.ct_unpack_linear(self.weight_packed, self.weight_scale, self.weight_shape,
                                        self.bits, self.group_size,
                                        getattr(self, "weight_zero_point", None),
                                        getattr(self, "weight_g_idx", None))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weight in `dtype` (default: the module dtype)."""
        return self.to_quantized().dequantize(torch.float32).to(dtype or self.dtype)

    # ---- kernel cache ----------------------------------------------------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache.clear()  # new buffers -> the repacked form is stale
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_cache.clear()  # .to() / .cuda() / .half() move or recast buffers
        return super()._apply(fn, *args, **kwargs)

    def kernel_weight(self, dtype: torch.dtype) -> KernelWeight:
        """The repacked weight for activations of `dtype`, built once per (device, dtype)."""
        anchor = self.qweight if self.layout != "compressed-tensors" else self.weight_packed
        key = (anchor.device, anchor.data_ptr(), dtype)
        kw = self._kernel_cache.get(key)
        if kw is None:
            self._kernel_cache.clear()
            kw = KernelWeight(self.to_quantized(), dtype, anchor.device)
            self._kernel_cache[key] = kw
        return kw

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        kw = self.kernel_weight(x.dtype if x.is_floating_point() else self.dtype)
        if x.device != kw.device:
            raise ValueError(f"input is on {x.device} but the quantized weight is on {kw.device}")
        if x.is_cuda and _triton_ok() and x.dtype in (torch.float16, torch.bfloat16):
            if x.stride(-1) != 1:
                x = x.contiguous()
            bias = self.bias
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            assert triton_dispatch is not None  # _triton_ok(): triton imported
            return triton_dispatch.quant_matmul(x, kw, bias)
        return _reference_matmul(x, kw, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, layout={self.layout}")


def _reference_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None):
    """Dequantize + matmul; fp32 math on CPU (no fast half GEMM there), cast back."""
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xin = x if kw.perm is None else x.index_select(-1, kw.perm)
    y = torch.matmul(xin.to(compute), kw.dequantize(compute))
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


# [whether forwards may use the Triton kernels]: a list, so a benchmark can turn them off
_TRITON_STATE: list[bool] = [triton_dispatch is not None]


def _triton_ok() -> bool:
    """True when triton imported (and the kernels are not turned off)."""
    return _TRITON_STATE[0]
