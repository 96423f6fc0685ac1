"""AutoAWQ GEMM export: the layout vLLM (`awq`, `awq_marlin`) and transformers read."""
from __future__ import annotations

from quantizer.errors import InputError
from quantizer.kernels.packing import QuantizedWeight, awq_pack_linear, awq_unpack_linear

FORMAT = "awq"


def check_supported(bits, symmetric: bool, act_order: bool = False) -> None:
    if bits != 4:
        raise InputError(f"the AWQ GEMM export holds 4-bit weights only (got --bits {bits}); "
                         "use --format gptq or --format compressed-tensors")
    if act_order:
        raise InputError("the AWQ GEMM export has no g_idx; act-order needs --format gptq")


def linear_tensors(prefix: str, q: QuantizedWeight) -> dict:
    return {f"{prefix}.{k}": v for k, v in awq_pack_linear(q).items()}


def linear_from_tensors(prefix: str, tensors: dict, group_size: int | None = None
                        ) -> QuantizedWeight:
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales = tensors[f"{prefix}.scales"]
    in_features = qweight.shape[0]
    gs = in_features // scales.shape[0] if group_size is None else group_size
    return awq_unpack_linear(qweight, qzeros, scales, -1 if gs == in_features else gs)


def quantization_config(bits: int, group_size: int, not_converted: list[str], **_) -> dict:
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": not_converted or None,
    }
