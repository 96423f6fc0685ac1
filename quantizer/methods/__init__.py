"""Quantization methods. Each turns (decoder layer, calibration inputs, settings) into
QuantizedWeight per linear; methods never load files or choose devices.

A method is an object with `name`, `needs_calibration` and `quantize_layer(ctx)` where ctx is
a quantizer.run.pipeline.LayerContext. It may change the layer's float weights (AWQ folds scales
into norms); it returns {linear name: QuantizedWeight}. The pipeline then swaps each linear's
weight for its dequantized value and runs the layer to produce the next layer's inputs."""
from __future__ import annotations

from ..errors import InputError
from .rtn import RTN

_METHODS = {"rtn": RTN}


def register_method(name: str, factory) -> None:
    _METHODS[name] = factory


def available() -> list[str]:
    _load_optional()
    return sorted(_METHODS)


def _load_optional() -> None:
    # Imported lazily so a broken optional method never breaks `rtn`.
    for mod in ("awq", "gptq", "awq_gptq"):
        try:
            __import__(f"{__name__}.{mod}")
        except ImportError:
            pass


def get_method(name: str, **options):
    _load_optional()
    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](**options)
