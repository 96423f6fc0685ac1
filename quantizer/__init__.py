"""layerquant: a memory-budgeted, layer-by-layer quantizer for LLMs.

    from quantizer import quantize, evaluate, load
    result = quantize("path/to/model", bits=4, method="awq", output="out/")
"""
__version__ = "0.1.0"

_API = ("quantize", "measure", "evaluate", "load", "QuantResult", "EvalResult")


def __getattr__(name):
    # Lazy, so `import quantizer.kernels` stays light and never imports transformers.
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'quantizer' has no attribute {name!r}")


__all__ = list(_API)
