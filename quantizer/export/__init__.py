"""Pack and write: the exporters (AutoAWQ GEMM, GPTQ, compressed-tensors), the sharded writer,
the serving rules (vLLM's load-time checks) and the tensor-parallel shape checks.

An exporter module provides `FORMAT`, `check_supported(bits, symmetric, act_order)`,
`linear_tensors(prefix, QuantizedWeight) -> {name: tensor}`, its inverse
`linear_from_tensors(prefix, tensors) -> QuantizedWeight` (resume replays layers through it),
and `quantization_config(bits, group_size, not_converted, **details) -> dict`."""
from __future__ import annotations

from ..errors import InputError
from . import awq_gemm, compressed_tensors, gptq

EXPORTERS = {m.FORMAT: m for m in (awq_gemm, gptq, compressed_tensors)}


def get_exporter(fmt: str):
    if fmt not in EXPORTERS:
        raise InputError(f"unknown export format {fmt!r}; available: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[fmt]
