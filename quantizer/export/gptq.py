"""GPTQ export: the layout AutoGPTQ / GPTQModel, transformers and vLLM (`gptq`, `gptq_marlin`)
load. Pure tensor -> tensor-dict conversion; the packing order lives in kernels/packing.py.

Per linear: {prefix}.qweight int32 (in*bits/32, out), .qzeros int32 (in/G, out*bits/32),
.scales fp16 (in/G, out), .g_idx int32 (in,) (always written, i // G without act-order)."""
from __future__ import annotations


import torch

from quantizer.errors import InputError
from quantizer.kernels.packing import (GPTQ_CHECKPOINT_FORMATS, QuantizedWeight, gptq_pack_linear,
                                       gptq_unpack_linear)
from quantizer.settings import GPTQOptions


FORMAT = "gptq"
# vLLM's GPTQ kernels (exllama / gptq_marlin) and AutoGPTQ's pack for these widths only.
VLLM_GPTQ_BITS = (2, 3, 4, 8)


def check_supported(bits, symmetric: bool = False, act_order: bool = False) -> None:
    if bits not in VLLM_GPTQ_BITS:
        raise InputError(f"the GPTQ export holds {'/'.join(map(str, VLLM_GPTQ_BITS))}-bit "
                         f"weights (what vLLM's GPTQ kernels load), got {bits}-bit; use "
                         f"--format compressed-tensors for other widths")


def lift_zero_points(q: QuantizedWeight, prefix: str = "weight") -> QuantizedWeight:
    """The same weight with no zero point 0, for checkpoint_format "gptq" (which stores
    zero-1, so v1 readers would read 0 back as 2^bits). A (row, group) with zero 0 whose codes
    stay below the top code is shifted losslessly (zero+1, codes+1): all-zero rows (padded
    channels) and most skewed groups. Anything else cannot be stored in v1."""
    maxq = (1 << q.bits) - 1
    g = q.group_index().to(q.codes.device)
    codes = q.codes.to(torch.int64)
    top = torch.zeros(q.zeros.shape, dtype=torch.int64, device=codes.device).scatter_reduce_(
        1, g.expand_as(codes), codes, "amax", include_self=False)
    lift = (q.zeros.to(torch.int64) == 0) & (top < maxq)
    zeros = q.zeros.to(torch.int64) + lift
    if int(zeros.min()) < 1:
        raise InputError(f"{prefix}: a zero point of 0 with the top code in use cannot be "
                         f"stored in checkpoint_format 'gptq' (it stores zero-1); export with "
                         f"checkpoint_format 'gptq_v2' or quantize with the gptq method (it "
                         f"never produces zero 0)")
    codes = codes + lift.to(torch.int64).gather(1, g.expand_as(codes))
    return QuantizedWeight(codes.to(q.codes.dtype), q.scales, zeros.to(q.zeros.dtype), q.bits,
                           q.group_size, q.g_idx, q.symmetric)


def gptq_tensors(prefix: str, q: QuantizedWeight, checkpoint_format: str = "gptq"
                 ) -> dict[str, torch.Tensor]:
    """{prefix}.qweight/.qzeros/.scales/.g_idx for one linear.

    checkpoint_format "gptq" (v1, what vLLM and AutoGPTQ read by default) stores zero-1;
    "gptq_v2" (GPTQModel) stores the raw zero point."""
    check_supported(q.bits)
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, got "
                         f"{checkpoint_format!r}")
    if checkpoint_format == "gptq" and q.zeros.numel() and not q.zeros.is_meta \
            and int(q.zeros.min()) < 1:
        q = lift_zero_points(q, prefix)
    if q.in_features * q.bits % 32 or q.out_features * q.bits % 32:
        raise InputError(f"{prefix}: GPTQ packing needs in and out features whose bit counts "
                         f"are multiples of 32, got {tuple(q.codes.shape)} at {q.bits}-bit")
    return {f"{prefix}.{k}": v for k, v in gptq_pack_linear(q, checkpoint_format).items()}


def gptq_quantization_config(bits: int, group_size: int, symmetric: bool, act_order: bool,
                             static_groups: bool = False, damp: float = GPTQOptions.damp,
                             true_sequential: bool = True, checkpoint_format: str = "gptq",
                             not_converted: list[str] | None = None,
                             dynamic: dict | None = None) -> dict:
    """The config.json "quantization_config" for a uniform GPTQ checkpoint.

    `dynamic` (GPTQModel's per-module overrides, read by vLLM: {"+:regex": {"bits": ..}}) is
    passed through when given."""
    check_supported(bits)
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}")
    cfg = {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": int(group_size),
        # Static groups keep g_idx = i // G, which loaders serve fastest without desc_act.
        "desc_act": bool(act_order) and not static_groups,
        "sym": bool(symmetric),
        "static_groups": bool(static_groups),
        "damp_percent": float(damp),
        "true_sequential": bool(true_sequential),
        "checkpoint_format": checkpoint_format,
        "lm_head": False,
        "meta": {"quantizer": ["layerquant"]},
    }
    if not_converted:
        cfg["modules_to_not_convert"] = list(not_converted)
    if dynamic:
        cfg["dynamic"] = dict(dynamic)
    return cfg


# ---- the exporter-module interface quantizer.export.get_exporter hands to the writer ----
def linear_tensors(prefix: str, q: QuantizedWeight, checkpoint_format: str = "gptq") -> dict:
    return gptq_tensors(prefix, q, checkpoint_format)


def linear_from_tensors(prefix: str, tensors: dict, group_size: int | None = None,
                        checkpoint_format: str = "gptq") -> QuantizedWeight:
    """Inverse of linear_tensors; bits and group size follow from the tensors' shapes."""
    qweight, g_idx = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.g_idx"]
    scales = tensors[f"{prefix}.scales"]
    in_features = g_idx.shape[0]
    bits = qweight.shape[0] * 32 // in_features
    if group_size is None:
        n_groups = scales.shape[0]
        group_size = -1 if n_groups == 1 else in_features // n_groups
    return gptq_unpack_linear(qweight, tensors[f"{prefix}.qzeros"], scales, g_idx, bits,
                              group_size, checkpoint_format)


def quantization_config(bits: int, group_size: int, not_converted: list[str], **details) -> dict:
    return gptq_quantization_config(
        bits, group_size, symmetric=bool(details.get("symmetric", False)),
        act_order=bool(details.get("act_order", False)),
        static_groups=bool(details.get("static_groups", False)),
        damp=float(details.get("damp", GPTQOptions.damp)),
        checkpoint_format=details.get("checkpoint_format", "gptq"),
        not_converted=not_converted)

