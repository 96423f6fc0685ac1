"""Read checkpoints back: float originals and our quantized exports (AWQ GEMM, GPTQ,
compressed-tensors), one decoder layer at a time or as a whole model."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantizer.kernels.quant_linear import QuantLinear

from ..errors import InputError
from ..stream.skeleton import build_skeleton, decoder_layers, load_layer, release_layer
from ..stream.source import CheckpointSource


@dataclass
class ModuleQuant:
    bits: int
    group_size: int
    layout: str
    symmetric: bool = False
    act_order: bool = False
    checkpoint_format: str = "gptq"


@dataclass
class QuantSpec:
    """How each linear of a quantized checkpoint is stored (None = not quantized)."""

    default: ModuleQuant | None
    targets: list[tuple[str, ModuleQuant]] = field(default_factory=list)  # (pattern, quant)
    ignore: list[str] = field(default_factory=list)

    def for_module(self, full_name: str) -> ModuleQuant | None:
        if any(_matches(p, full_name) for p in self.ignore):
            return None
        for pattern, q in self.targets:
            if _matches(pattern, full_name):
                return q
        return self.default


def _matches(pattern: str, name: str) -> bool:
    if pattern == "Linear":  # llm-compressor's class-name target: every quantized linear
        return True
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None or re.search(
            pattern[3:] + r"$", name) is not None
    return name == pattern or name.endswith("." + pattern)


def quant_spec(config: dict) -> QuantSpec | None:
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "awq":
        if qc.get("version", "gemm").lower() != "gemm":
            raise InputError(f"AWQ version {qc.get('version')!r} is not supported (gemm only)")
        return QuantSpec(ModuleQuant(int(qc["bits"]), int(qc["group_size"]), "awq"),
                         ignore=list(qc.get("modules_to_not_convert") or []))
    if method == "gptq":
        return QuantSpec(ModuleQuant(int(qc["bits"]), int(qc["group_size"]), "gptq",
                                     symmetric=bool(qc.get("sym", True)),
                                     act_order=bool(qc.get("desc_act", False)),
                                     checkpoint_format=qc.get("checkpoint_format", "gptq")),
                         ignore=list(qc.get("modules_to_not_convert") or []))
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise InputError(f"compressed-tensors format {qc.get('format')!r} is not supported "
                             "(pack-quantized only)")
        targets = []
        for group in qc.get("config_groups", {}).values():
            w = group["weights"]
            mq = ModuleQuant(int(w["num_bits"]), int(w.get("group_size") or -1),
                             "compressed-tensors", symmetric=bool(w.get("symmetric", True)),
                             # "weight" (static groups) keeps columns in order: no g_idx
                             act_order=w.get("actorder") in ("group", "dynamic", True))
            targets += [(t, mq) for t in group.get("targets", [])]
        return QuantSpec(None, targets, ignore=list(qc.get("ignore") or []))
    raise InputError(f"unsupported quant_method {method!r} (awq, gptq, compressed-tensors)")


def install_quant_linears(layer: nn.Module, prefix: str, linears, spec: QuantSpec,
                          dtype: torch.dtype) -> None:
    """Swap the meta nn.Linear modules that the checkpoint stores quantized for QuantLinear."""
    for name in linears:
        q = spec.for_module(f"{prefix}.{name}")
        if q is None:
            continue
        lin = layer.get_submodule(name)
        assert isinstance(lin, nn.Linear)  # the skeleton's float linear, on the meta device
        new = QuantLinear(lin.in_features, lin.out_features, bits=q.bits,
                          group_size=q.group_size, layout=q.layout, bias=lin.bias is not None,
                          dtype=dtype, device="meta", checkpoint_format=q.checkpoint_format,
                          symmetric=q.symmetric, act_order=q.act_order)
        parent_name, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)


class LayerLoader:
    """Materialises decoder layers of a float or quantized checkpoint on demand."""

    def __init__(self, path, dtype: torch.dtype, device="cpu", head_device="cpu",
                 text_only: bool = True):
        self.source = CheckpointSource(path)
        self.spec = quant_spec(self.source.raw_config)
        self.dtype, self.device = dtype, torch.device(device)
        # text_only: a vision tower stays on the meta device (evaluation reads text)
        self.model = build_skeleton(self.source, head_device, dtype, text_only=text_only)

    @property
    def num_layers(self) -> int:
        return self.source.num_layers

    def load(self, index: int) -> nn.Module:
        arch = self.source.arch
        if self.spec is not None:
            layer = decoder_layers(self.model)[index]
            linears = arch.for_layer(self.model.config, index).linears  # MoE: every expert
            install_quant_linears(layer, arch.layer_prefix(index), linears, self.spec,
                                  self.dtype)
        return load_layer(self.model, self.source, index, self.device, self.dtype)

    def release(self, index: int) -> None:
        release_layer(self.model, index)


def load(path, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The whole model, with QuantLinear modules where the checkpoint is quantized (for
    notebooks and small models: unlike evaluation, this holds every layer at once)."""
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    loader = LayerLoader(Path(path), dtype, device, head_device=device, text_only=False)
    if loader.spec is None:  # said, not silent: a float model is not what load() is for
        warnings.warn(f"{path} has no quantization_config: it is not a quantized export, so "
                      f"load() returns the plain float model (no QuantLinear modules)",
                      UserWarning, stacklevel=3)
    for i in range(loader.num_layers):
        loader.load(i)
    return loader.model.eval()  # as from_pretrained: the modules put in are made in train mode
