"""Model structure: discovered from transformers' own modules (discover.py), with small
per-family overrides where discovery cannot decide (family.py).

`model_arch(config_dict, disk_names)` gives a model's ModelArch; `get_arch(model_type)` the one
of transformers' default config for that type (tests and tools that only need names)."""
from __future__ import annotations

from .base import ArchSpec, MoESpec, ScaleGroup
from .family import FAMILIES, Family, family_for
from .meta import config_from_dict
from .model import LayerKind, ModelArch, model_arch


def get_arch(config) -> ModelArch:
    """ModelArch of a config.json dict, or of transformers' default config of a model type."""
    if isinstance(config, str):
        config = config_from_dict({"model_type": config}).to_dict()
    return model_arch(config)


def supported() -> list[str]:
    """Families tested end to end (the family zoo's list is the full story)."""
    return sorted(k for k, f in FAMILIES.items() if not f.refused)


__all__ = ["ArchSpec", "FAMILIES", "Family", "LayerKind", "ModelArch", "MoESpec", "ScaleGroup",
           "family_for", "get_arch", "model_arch", "supported"]
