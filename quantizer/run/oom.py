"""Out-of-memory recovery for one layer: recognise an OOM, free what the failed attempt held,
shrink what the next attempt uses, and a test hook that injects an OOM on chosen layers.

The hook: LAYERQUANT_INJECT_OOM="3" raises torch.cuda.OutOfMemoryError (constructible without
a GPU) on the first attempt at layer 3; "1,3x2" on the first attempt at layer 1 and the first
two at layer 3. It fires after the method has quantized the layer, so the retry must undo a
layer whose weights, statistics and GPU memory are all in use."""
from __future__ import annotations

import gc
import os
from dataclasses import replace

import torch

INJECT_ENV = "LAYERQUANT_INJECT_OOM"


def injection_plan(text: str | None = None) -> dict[int, int]:
    """{layer: number of first attempts that fail} from the hook's value."""
    text = os.environ.get(INJECT_ENV, "") if text is None else text
    out: dict[int, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        layer, _, times = item.partition("x")
        out[int(layer)] = int(times or 1)
    return out


def maybe_inject(plan: dict[int, int], layer: int, attempt: int) -> None:
    if attempt < plan.get(layer, 0):
        raise torch.cuda.OutOfMemoryError(
            f"injected by {INJECT_ENV} at layer {layer}, attempt {attempt + 1}")


def is_oom(e: BaseException) -> bool:
    """A recoverable allocation failure (CUDA caching allocator, or the host allocator on CPU
    runs). Not 'illegal memory access' and other sticky CUDA errors: those end the process."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text
                                            or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def shrink_local(dec):
    """The next attempt's decisions for a run without a memory plan (CPU runs): halve the
    chunk; at chunk 1 move the hidden states to disk. (decisions, step) or None."""
    if dec.chunk > 1:
        return replace(dec, chunk=dec.chunk // 2), "oom: chunk"
    if dec.hidden in ("gpu", "cpu"):
        return replace(dec, hidden="disk"), "oom: hidden_off_gpu"
    return None
