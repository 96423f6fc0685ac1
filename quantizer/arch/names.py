"""Tensor names on disk vs transformers' names in memory, from transformers' own conversion
rules: the renamings (and expert merges) `from_pretrained` applies to a checkpoint's keys.

A checkpoint keeps the names it was saved with: Qwen2-VL's original release has
`model.layers.N.*` and `visual.*`, which transformers 5 loads into
`model.language_model.layers.N.*` and `model.visual.*`; Mixtral's `block_sparse_moe.experts.E.w1`
becomes a slice of the fused `mlp.experts.gate_up_proj`. We read and write the names on disk
(vLLM's weight-name mappers expect them) and map each to the module that uses it here."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertSource:
    """Where transformers finds one fused expert parameter's per-expert tensors on disk:
    `leaves[k]` is the on-disk linear name (below `experts.E.`) of the k-th slice concatenated
    into the fused parameter (gate then up for `gate_up_proj`)."""

    fused: str  # the fused parameter's name relative to the experts module ("gate_up_proj")
    leaves: tuple[str, ...]  # ("w1", "w3") / ("gate_proj", "up_proj") / ("w2",)


def conversion_rules(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) transformers applies when loading `model`'s checkpoints; two
    empty lists for a transformers without conversion rules (4.x renames by class attribute)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return [], []
    # its signature differs between transformers releases: called untyped, tried newest first
    mapping: Callable[..., list] = get_model_conversion_mapping
    try:
        transforms = mapping(model, add_legacy=False)
    except TypeError:  # older signature
        transforms = mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _rename(key: str, transforms) -> tuple[str, str | None]:
    pattern = None
    for t in transforms:
        key, matched = t.rename_source_key(key)
        pattern = pattern or matched
    return key, pattern


def _patterns(t, attr: str) -> list[str]:
    return list(getattr(t, f"_original_{attr}", None) or getattr(t, attr))


def expert_sources(converters) -> dict[str, ExpertSource]:
    """{fused parameter leaf: ExpertSource} from transformers' MergeModulelist converters
    (`.experts.*.w1.weight` + `.experts.*.w3.weight` -> `.experts.gate_up_proj`)."""
    out = {}
    for c in converters:
        targets = _patterns(c, "target_patterns")
        sources = _patterns(c, "source_patterns")
        if len(targets) != 1 or not all("experts.*." in s for s in sources):
            continue
        fused = targets[0].rsplit(".", 1)[-1]
        leaves = tuple(s.split("experts.*.", 1)[1].removesuffix(".weight") for s in sources)
        out[fused] = ExpertSource(fused, leaves)
    return out


class NameMap:
    """disk name <-> memory name for one model. Built from the checkpoint's own names when
    there is a checkpoint (what transformers would load them as), else by reversing the
    renamings on the model's parameter names (config-only plans and checks)."""

    def __init__(self, model: nn.Module, disk_names=None):
        self.renamings, self.converters = conversion_rules(model)
        self.experts = expert_sources(self.converters)
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.memory_names = {n for n, _ in model.named_parameters()} | {
            n for n, _ in model.named_buffers()}
        self.disk_to_memory: dict[str, str] = {}
        self.memory_to_disk: dict[str, str] = {}
        if disk_names is not None:
            for name in disk_names:
                mem = self.to_memory(name)
                self.disk_to_memory[name] = mem
                self.memory_to_disk.setdefault(mem, name)

    def to_memory(self, disk: str) -> str:
        """The name transformers gives a checkpoint tensor, fused experts left per expert
        (our skeleton keeps them so: quantizer/moe.py)."""
        key, _ = _rename(disk, self.renamings)
        return self._base_prefix(key)

    def _base_prefix(self, key: str) -> str:
        """transformers adds or strips the base-model prefix ("model.") when the checkpoint
        was saved from the other side (a base model for a LM head model or back)."""
        p = self.prefix
        if not p or key in self.memory_names:
            return key
        if key.startswith(p + ".") and key[len(p) + 1:] in self.memory_names:
            return key[len(p) + 1:]
        if f"{p}.{key}" in self.memory_names:
            return f"{p}.{key}"
        return key

    def to_disk(self, memory: str) -> str:
        """The on-disk name of a memory name: the checkpoint's own where one maps to it, else
        the memory name with transformers' renamings reversed."""
        if memory in self.memory_to_disk:
            return self.memory_to_disk[memory]
        key = memory
        for t in reversed(self.renamings):
            try:
                key, _ = t.reverse_transform().rename_source_key(key)
            except (ValueError, AttributeError, re.error):
                continue
        return key
