"""Exporters: AutoAWQ GEMM, GPTQ, compressed-tensors; and the sharded writer.

An exporter module provides `FORMAT`, `check_supported(bits, symmetric, act_order)`,
`linear_tensors(prefix, QuantizedWeight) -> {name: tensor}`, its inverse
`linear_from_tensors(prefix, tensors) -> QuantizedWeight` (resume replays layers through it),
and `quantization_config(bits, group_size, not_converted, **details) -> dict`."""
from __future__ import annotations

from ..errors import InputError

_EXPORTERS: dict = {}


def register_exporter(module) -> None:
    _EXPORTERS[module.FORMAT] = module


from . import awq_gemm, compressed_tensors, gptq  # noqa: E402  (they register themselves)

for _m in (awq_gemm, gptq, compressed_tensors):
    register_exporter(_m)


def get_exporter(fmt: str):
    if fmt not in _EXPORTERS:
        raise InputError(f"unknown export format {fmt!r}; available: {', '.join(sorted(_EXPORTERS))}")
    return _EXPORTERS[fmt]
