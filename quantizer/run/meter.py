"""Measured memory: per-layer GPU peaks (allocator and driver view) or host RSS on CPU."""
from __future__ import annotations

import resource
import sys

import torch

from ..plan.machine import gpu_memory, process_gpu_bytes


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far. On Linux the address space's own
    high-water mark (VmHWM): ru_maxrss would also count the resident size of the process this
    one was forked from (a notebook or launcher), which exec records as the child's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, macOS: bytes
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict:
        """allocated / reserved: the caching allocator's peaks since reset(); nvml_used: the
        whole device's used memory now, as the driver sees it (context included; a sample
        at the end of the layer, not a peak), when nvidia-ml-py answers."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out = {"allocated": torch.cuda.max_memory_allocated(self.device),
                   "reserved": torch.cuda.max_memory_reserved(self.device)}
            index = self.device.index if self.device.index is not None else \
                torch.cuda.current_device()
            for i, _, total, free in gpu_memory([index]):
                if i == index:
                    out["nvml_used"] = total - free
            mine = process_gpu_bytes(index)
            if mine is not None:  # ours alone, sampled now: beyond the allocator's reservation
                # it is the CUDA context and library workspaces, which a budget covers too
                out["nvml_process"] = mine
                out["outside_allocator"] = mine - torch.cuda.memory_reserved(self.device)
            out["rss"] = rss_peak_bytes()  # the host's high-water mark so far (--ram-budget)
            return out
        return {"rss": rss_peak_bytes()}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
