"""Does a change to kernels/triton_w4a16.py change the code a GPU runs? Compiles its GEMV and dot
kernels for a CUDA target (default sm_90) over a grid of constexpr configurations, with no GPU
needed (Triton's own ptxas), and writes one PTX file per configuration with names, labels and
debug lines taken out. Two trees give identical files exactly when their kernels compile to
the same instructions, in the same order: refactors (helpers split out, which Triton inlines)
can be shown bit-identical this way.

    python tools/kernel_ptx.py --kernels /old/tree/kernels/triton_w4a16.py --out /tmp/ptx_old
    python tools/kernel_ptx.py --kernels kernels/triton_w4a16.py --out /tmp/ptx_new
    diff -r /tmp/ptx_old /tmp/ptx_new

Set TRITON_DISABLE_LINE_INFO=1 (done here unless set): inlined helpers otherwise add location
labels. --quick compiles 24 configurations (4-bit, no split-K, no bias) instead of 192, about
a minute on two cores against several."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

POINTERS = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
            "gidx_ptr": "*i32", "bias_ptr": "*fp16", "out_ptr": "*fp16", "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}
INTEGERS = ("M", "N", "K", "KP", "stride_xm", "G", "W_PER_SPLIT", "vmask", "n_splits")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"kernels_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalised(ptx: str) -> str:
    ptx = re.sub(r"^\s*\.(loc|file)\b.*$", "", ptx, flags=re.M)
    ptx = re.sub(r"\.section\s+\.debug.*", "", ptx, flags=re.S)
    ptx = re.sub(r"_(gemv|dot)_kernel", "KERNEL", ptx)
    ptx = re.sub(r"\$L__[A-Za-z_]*\d+", "LABEL", ptx)
    return "\n".join(line for line in ptx.splitlines() if line.strip()) + "\n"


def configurations(quick: bool):
    """(kernel name, constexprs, compile options, file name) of every configuration."""
    flags = list(itertools.product((4, 8), (False, True), (False, True)))  # cb, split, bias
    if quick:
        flags = [(4, False, False)]
    for (cb, split, bias), m, mode in itertools.product(flags, (1, 2, 4), (0, 1, 2)):
        for prefetch in ((False, True) if mode == 0 else (False,)):
            c = dict(SPLIT=split, CB=cb, BW=16 if cb == 4 else 32, BLOCK_M=m, BLOCK_N=64,
                     BLOCK_KW=16, GROUP_MODE=mode, HAS_BIAS=bias, PREFETCH=prefetch)
            yield "_gemv_kernel", c, dict(num_warps=4), (
                f"gemv_cb{cb}_m{m}_g{mode}_s{int(split)}_b{int(bias)}_p{int(prefetch)}")
    for (cb, split, bias), m, mode, swap in itertools.product(flags, (16, 64), (0, 1, 2),
                                                             (False, True)):
        c = dict(SPLIT=split, CB=cb, BW=16 if cb == 4 else 32, BLOCK_M=m, BLOCK_N=64,
                 BLOCK_KW=16, GROUP_M=8, GROUP_MODE=mode, HAS_BIAS=bias, SWAP=swap)
        yield "_dot_kernel", c, dict(num_warps=4, num_stages=3), (
            f"dot_cb{cb}_m{m}_g{mode}_s{int(split)}_b{int(bias)}_w{int(swap)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=Path, default=Path("kernels/triton_w4a16.py"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _load(a.kernels.resolve())
    a.out.mkdir(parents=True, exist_ok=True)
    target = GPUTarget("cuda", a.arch, 32)
    n = 0
    for name, consts, options, file in configurations(a.quick):
        fn = getattr(module, name)
        signature = {**POINTERS, **{k: "i32" for k in INTEGERS}, **{k: "constexpr" for k in consts}}
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=target, options=options)
        (a.out / f"{file}.ptx").write_text(_normalised(compiled.asm["ptx"]))
        n += 1
    print(f"{n} configurations compiled for sm_{a.arch} into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
