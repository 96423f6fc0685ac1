"""Exporters: AutoAWQ GEMM, GPTQ, compressed-tensors; and the sharded writer.

An exporter module provides `FORMAT`, `check_supported(bits, symmetric, act_order)`,
`linear_tensors(prefix, QuantizedWeight) -> {name: tensor}` and
`quantization_config(bits, group_size, not_converted, **details) -> dict`."""
from __future__ import annotations

from ..errors import InputError
from . import awq_gemm

_EXPORTERS = {"awq": awq_gemm}


def register_exporter(module) -> None:
    _EXPORTERS[module.FORMAT] = module


def get_exporter(fmt: str):
    for optional in ("gptq_format", "ct_format"):
        try:
            __import__(f"{__name__}.{optional}")
        except ImportError:
            pass
    if fmt not in _EXPORTERS:
        raise InputError(f"unknown export format {fmt!r}; available: {', '.join(sorted(_EXPORTERS))}")
    return _EXPORTERS[fmt]
