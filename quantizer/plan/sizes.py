"""Memory sizes as people type them ("40G", "12GiB", "0:20G,1:40G") and as we print them.

Every unit is binary: K/KB/KiB = 2**10, M/MB/MiB = 2**20, G/GB/GiB = 2**30, T/TB/TiB = 2**40.
"40G" and "40GiB" mean the same 40 × 2**30 bytes, because GPU memory is reported in binary
units (an "80 GB" H100 has 80 GiB) and a budget that silently shrinks by 7% when written
"GB" would surprise more than it would help. A bare number is a count of bytes."""
from __future__ import annotations

import contextlib
import math
import os
import re

from ..errors import InputError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kb": KIB, "kib": KIB,
    "m": MIB, "mb": MIB, "mib": MIB,
    "g": GIB, "gb": GIB, "gib": GIB,
    "t": TIB, "tb": TIB, "tib": TIB,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'40G' -> 42949672960. Integers pass through. Raises InputError on anything else."""
    if isinstance(text, bool):
        raise InputError(f"not a memory size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InputError(f"memory size must not be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise InputError(f"not a memory size: {text!r}")
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"not a memory size: {text!r} (expected e.g. 40G, 12GiB, 512M, 1.5T)")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InputError(f"unknown unit {unit!r} in memory size {text!r}; "
                         f"use B, K, M, G or T (all binary: G = GiB = 2**30 bytes)")
    value = float(number) * factor
    if not math.isfinite(value):
        raise InputError(f"memory size out of range: {text!r}")
    return int(value)


def parse_budgets(text: str, devices: list[int] | None = None) -> dict[int, int]:
    """'40G' -> the same budget for every device; '0:20G,1:40G' -> one budget per device.

    With a per-device list, every device in `devices` must be named and no other; when
    `devices` is None the list itself says which devices there are."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty memory budget: {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        size = parse_size(parts[0])
        if devices is None:
            raise InputError(f"budget {text!r} names no device and no device list was given")
        return {int(d): size for d in devices}
    budgets: dict[int, int] = {}
    for part in parts:
        dev, sep, size = part.partition(":")
        if not sep:
            raise InputError(f"budget entry {part!r} in {text!r}: mix of per-device and global "
                             f"budgets; write every entry as DEVICE:SIZE")
        try:
            index = int(dev.strip())
        except ValueError:
            raise InputError(f"budget entry {part!r}: device {dev!r} is not an index") from None
        if index < 0:
            raise InputError(f"budget entry {part!r}: device index must not be negative")
        if index in budgets:
            raise InputError(f"device {index} has two budgets in {text!r}")
        budgets[index] = parse_size(size)
    if devices is not None:
        missing = sorted(set(devices) - set(budgets))
        extra = sorted(set(budgets) - set(devices))
        if missing:
            raise InputError(f"no budget for device(s) {missing} in {text!r}")
        if extra:
            raise InputError(f"budget for device(s) {extra} that are not in use {list(devices)}")
    return budgets


def format_size(n: int | float) -> str:
    """Binary units, one decimal: 8589934592 -> '8.0 GiB'."""
    n = float(n)
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def format_size_up(n: int | float) -> str:
    """Like format_size but rounded up, for a 'needs at least' message: never understates."""
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB)):
        if n >= factor:
            return f"{math.ceil(n / factor * 10) / 10:.1f} {unit}"
    return f"{math.ceil(n / KIB)} KiB"


# ---------------------------------------------------------------- what the machine has

def vram_margin(total_bytes: int) -> int:
    """Kept free below the reported free memory: other processes' growth, NCCL buffers and
    driver allocations that appear after we measured."""
    return max(512 * MIB, total_bytes // 20)


@contextlib.contextmanager
def _nvml():
    """nvidia-ml-py, initialised (imported lazily), or None when it is not installed or no
    NVIDIA driver answers (pynvml raises NVMLError subclasses)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        pynvml = None
    if pynvml is None:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _physical_indices(count: int) -> list[int]:
    """The NVML index of each torch cuda:i: CUDA_VISIBLE_DEVICES when it lists plain indices
    (UUIDs and an unset variable leave NVML's order, which is then torch's)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(p.strip().isdigit() for p in visible.split(",") if p):
        return [int(p) for p in visible.split(",") if p.strip()]
    return list(range(count))


def gpu_memory(indices: list[int] | None = None) -> list[tuple[int, str, int, int]]:
    """(index, name, total bytes, free bytes) per visible GPU from nvidia-ml-py; [] without
    it or without a driver. Index i is what torch calls cuda:i."""
    with _nvml() as nvml:
        if nvml is None:
            return []
        out = []
        for logical, phys in enumerate(_physical_indices(nvml.nvmlDeviceGetCount())):
            if indices is not None and logical not in indices:
                continue
            handle = nvml.nvmlDeviceGetHandleByIndex(phys)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append((logical, name, int(info.total), int(info.free)))
        return out


def default_ram_budget() -> int:
    """Available host memory (psutil) minus max(1 GiB, 10%) for the OS and page cache."""
    import psutil

    available = psutil.virtual_memory().available
    return max(0, available - max(GIB, available // 10))


def process_gpu_bytes(index: int) -> int | None:
    """GPU memory this process holds on torch's cuda:`index` as the driver counts it (CUDA
    context, cuBLAS workspaces and the caching allocator's reservations together): what a
    --vram-budget must cover. None when nvidia-ml-py cannot say (not installed, or a PID
    namespace hides our process id from the driver)."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        try:
            phys = _physical_indices(nvml.nvmlDeviceGetCount())[index]
            handle = nvml.nvmlDeviceGetHandleByIndex(phys)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except Exception:  # NVMLError subclasses: an unsupported query is an unknown
            return None
    return None
