"""GPTQ export: the layout AutoGPTQ / GPTQModel, transformers and vLLM (`gptq`, `gptq_marlin`)
load. Pure tensor -> tensor-dict conversion; the packing order lives in kernels/packing.py.

Per linear: {prefix}.qweight int32 (in*bits/32, out), .qzeros int32 (in/G, out*bits/32),
.scales fp16 (in/G, out), .g_idx int32 (in,) (always written, i // G without act-order)."""
from __future__ import annotations

import sys

import torch

from quantizer.errors import InputError
from quantizer.kernels.packing import GPTQ_CHECKPOINT_FORMATS, QuantizedWeight, gptq_pack_linear

from . import register_exporter

FORMAT = "gptq"
# vLLM's GPTQ kernels (exllama / gptq_marlin) and AutoGPTQ's pack for these widths only.
VLLM_GPTQ_BITS = (2, 3, 4, 8)


def check_supported(bits, symmetric: bool = False, act_order: bool = False) -> None:
    if bits not in VLLM_GPTQ_BITS:
        raise InputError(f"the GPTQ export holds {'/'.join(map(str, VLLM_GPTQ_BITS))}-bit "
                         f"weights (what vLLM's GPTQ kernels load), got {bits}-bit; use "
                         f"--format compressed-tensors for other widths")


def gptq_tensors(prefix: str, q: QuantizedWeight, checkpoint_format: str = "gptq"
                 ) -> dict[str, torch.Tensor]:
    """{prefix}.qweight/.qzeros/.scales/.g_idx for one linear.

    checkpoint_format "gptq" (v1, what vLLM and AutoGPTQ read by default) stores zero-1;
    "gptq_v2" (GPTQModel) stores the raw zero point."""
    check_supported(q.bits)
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, got "
                         f"{checkpoint_format!r}")
    if checkpoint_format == "gptq" and q.zeros.numel() and int(q.zeros.min()) < 1:
        # v1 readers add 1 to the stored zero-1 without wrapping, so 0 would read as 2^bits.
        raise InputError(f"{prefix}: a zero point of 0 cannot be stored in checkpoint_format "
                         f"'gptq' (it stores zero-1); export with checkpoint_format 'gptq_v2' "
                         f"or quantize with the gptq method (it never produces zero 0)")
    if q.in_features * q.bits % 32 or q.out_features * q.bits % 32:
        raise InputError(f"{prefix}: GPTQ packing needs in and out features whose bit counts "
                         f"are multiples of 32, got {tuple(q.codes.shape)} at {q.bits}-bit")
    return {f"{prefix}.{k}": v for k, v in gptq_pack_linear(q, checkpoint_format).items()}


def gptq_quantization_config(bits: int, group_size: int, symmetric: bool, act_order: bool,
                             static_groups: bool = False, damp: float = 0.01,
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


def quantization_config(bits: int, group_size: int, not_converted: list[str], **details) -> dict:
    return gptq_quantization_config(
        bits, group_size, symmetric=bool(details.get("symmetric", False)),
        act_order=bool(details.get("act_order", False)),
        static_groups=bool(details.get("static_groups", False)),
        damp=float(details.get("damp", 0.01)),
        checkpoint_format=details.get("checkpoint_format", "gptq"),
        not_converted=not_converted)


register_exporter(sys.modules[__name__])
