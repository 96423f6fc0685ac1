"""Model-family registry: one small declarative file per family."""
from __future__ import annotations

from ..errors import InputError
from . import deepseek, llama, mistral, mixtral, qwen2, qwen3, qwen_moe
from .base import ArchSpec, MoESpec, ScaleGroup

_SPECS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        _SPECS[t] = spec
    return spec


for _spec in (llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC, mixtral.SPEC,
              qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, deepseek.SPEC):
    register(_spec)


def supported() -> list[str]:
    return sorted(_SPECS)


def get_arch(model_type: str) -> ArchSpec:
    try:
        return _SPECS[model_type]
    except KeyError:
        raise InputError(f"unsupported architecture {model_type!r}; supported: "
                         f"{', '.join(supported())}") from None


__all__ = ["ArchSpec", "MoESpec", "ScaleGroup", "get_arch", "register", "supported"]
