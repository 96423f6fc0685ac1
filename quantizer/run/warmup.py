"""One-off costs of a run, paid once per machine or overlapped with the start (where Triton
keeps the kernels it compiles: run/caches.py).

- `start(device)`: on a GPU, a thread initialises CUDA and loads what the first layer would
  otherwise wait for (cuBLAS / cuBLASLt handles, cuSOLVER, triton and the GPTQ solver kernel,
  the probe of the GEMM that adds GPTQ's XᵀX)
  while the main thread imports transformers and reads the model's config. `wait()` is called
  before the memory plan reads free memory (so the plan sees the same device as without it).
  Nothing here changes a result: the kernels are the ones the run compiles anyway.
  LAYERQUANT_WARMUP=0 turns the thread off."""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from ..methods.gptq_columns import gptq_group_params
from ..methods.gptq_hessian import gram_mode
from ..methods.gptq_triton import available, solve_columns_triton

log = logging.getLogger(__name__)

_STATE: dict = {"thread": None, "seconds": None, "error": None}


def start(target) -> None:
    """Begin warming a GPU on a thread (once per process; nothing for the CPU). `target`: a
    torch.device or settings with `torch_device()`; a device that does not resolve is left to
    the run to refuse."""
    if _STATE["thread"] is not None or os.environ.get("LAYERQUANT_WARMUP", "1") == "0":
        return
    try:
        device = target.torch_device() if hasattr(target, "torch_device") else target
        if (device.type != "cuda" or not torch.cuda.is_available()
                or (device.index or 0) >= torch.cuda.device_count()):
            return
    except Exception:  # noqa: BLE001
        return
    t = threading.Thread(target=_run, args=(device,), name="layerquant-warmup", daemon=True)
    _STATE["thread"] = t
    t.start()


def wait() -> float | None:
    """Join the warm-up thread; its seconds (None when none ran). Never raises: a failed
    warm-up only means the first layer pays those costs itself."""
    t = _STATE["thread"]
    if t is not None:
        t.join()
    return _STATE["seconds"]


def _run(device) -> None:
    t0 = time.perf_counter()
    try:
        _warm(device)
    except Exception as e:  # noqa: BLE001 - logged; the run itself reports real failures
        _STATE["error"] = f"{type(e).__name__}: {e}"
        log.debug("warm-up failed: %s", _STATE["error"])
    _STATE["seconds"] = time.perf_counter() - t0


def _warm(device) -> None:
    with torch.cuda.device(device), torch.no_grad():
        x = torch.ones((64, 64), device=device)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            a = x.to(dtype)
            torch.mm(a, a)
            torch.addmm(a, a, a, beta=0.5, alpha=2.0)
        spd = x * 0.01 + torch.eye(64, device=device) * 64
        factor, _ = torch.linalg.cholesky_ex(spd)
        torch.linalg.solve_triangular(factor, x, upper=False)
        _warm_gptq_kernel(device)
        gram_mode(device)  # which GEMM adds XᵀX here: probed now, not inside layer 0
        del x, spd, factor
        torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the plan reads free memory after this


def _warm_gptq_kernel(device) -> None:
    """Compile (or load from the cache) the GPTQ column kernel with the argument
    specialisations a real solve uses (widths and strides multiples of 16, 128-column
    blocks), so the first layer finds it built."""
    if not available():
        return
    n, out_f, block, gs, bits = 256, 32, 128, 128, 4
    gen = torch.Generator(device=device).manual_seed(0)
    WT = torch.randn((n, out_f), device=device, generator=gen)
    U = torch.eye(n, device=device)
    QT = torch.empty_like(WT)
    scales = torch.ones((n // gs, out_f), device=device)
    zeros = torch.zeros((n // gs, out_f), device=device)
    gid = (torch.arange(n, device=device) // gs).to(torch.int32)

    def params(w, col):  # min-max group parameters: the compiled kernel is the same for any
        return gptq_group_params(w, bits, False)

    solve_columns_triton(WT, U, QT, scales, zeros, gid, True, gs, block, bits, params)
