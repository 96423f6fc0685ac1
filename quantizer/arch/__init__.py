"""Model-family registry: one small declarative file per family."""
from __future__ import annotations

from ..errors import InputError
from . import llama, mistral, qwen2, qwen3
from .base import ArchSpec, ScaleGroup

_SPECS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        _SPECS[t] = spec
    return spec


for _module in (llama, mistral, qwen2, qwen3):
    register(_module.SPEC)


def supported() -> list[str]:
    return sorted(_SPECS)


def get_arch(model_type: str) -> ArchSpec:
    try:
        return _SPECS[model_type]
    except KeyError:
        raise InputError(f"unsupported architecture {model_type!r}; supported: "
                         f"{', '.join(supported())}") from None


__all__ = ["ArchSpec", "ScaleGroup", "get_arch", "register", "supported"]
