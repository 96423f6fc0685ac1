"""Where compiled Triton kernels are kept: ~/.cache/layerquant/triton (under $XDG_CACHE_HOME
when set) unless TRITON_CACHE_DIR says otherwise, so a run reuses the GPTQ solver and
quantized-matmul kernels an earlier run compiled. Triton reads the variable when it compiles,
so this holds even where triton was imported first. Standard library only: the CLI calls
`configure_caches()` before it parses arguments (--help and refusals import no torch)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerquant"


def configure_caches() -> None:
    if os.environ.get("TRITON_CACHE_DIR"):
        return
    path = cache_root() / "triton"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: Triton's own default applies
        return
    os.environ["TRITON_CACHE_DIR"] = str(path)
