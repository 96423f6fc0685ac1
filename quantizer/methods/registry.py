"""The methods by name, built with their typed options (settings.GPTQOptions / AWQOptions /
RoundingOptions)."""
from __future__ import annotations

from ..errors import InputError
from .awq import AWQ
from .awq_gptq import AWQGPTQ
from .gptq import GPTQ
from .rtn import RTN

METHODS = {"rtn": RTN, "awq": AWQ, "gptq": GPTQ, "awq-gptq": AWQGPTQ}


def get_method(name: str, options=None, rounding=None, **kwargs):
    """The method `name` with `options` (its options class, awq-gptq: an (AWQOptions,
    GPTQOptions) pair; default: its defaults), the rounding options every method takes, and
    keyword overrides (damp=0.05, scale_search="mse", module_settings={...} for GPTQ)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](options, rounding=rounding, **kwargs)


def method_for(settings, **kwargs):
    """The method of validated settings (settings.QuantSettings), with its options."""
    options = (settings.awq, settings.gptq) if settings.method == "awq-gptq" else settings.options
    return get_method(settings.method, options, settings.rounding, **kwargs)


def needs_calibration(name: str) -> bool:
    """Whether the method `name` with its default options calibrates (RTN does only with
    --scale-search imatrix; a run calibrates whenever samples are asked for anyway)."""
    return bool(get_method(name).needs_calibration)
