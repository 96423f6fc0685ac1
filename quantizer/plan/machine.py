"""What the machine has: GPUs and their free memory (from the driver, NVML, so that asking
never initialises CUDA in a process that only plans or launches others), host memory, and the
budgets a plan takes when --vram-budget / --ram-budget are not given. One path for a run and for
`quantize plan`: `gpu_budgets` and `host_budget`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import psutil
import torch

from ..errors import InputError
from .sizes import GIB, MIB, format_size


@dataclass(frozen=True)
class DeviceSpec:
    index: int  # CUDA ordinal; -1 is the host CPU
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = 0

    @property
    def is_host(self) -> bool:
        return self.index < 0

    @property
    def label(self) -> str:
        return "cpu" if self.is_host else f"cuda:{self.index}"


HOST = DeviceSpec(-1, "host")


def vram_margin(total_bytes: int) -> int:
    """Kept free below the reported free memory: other processes' growth, NCCL buffers and
    driver allocations that appear after we measured."""
    return max(512 * MIB, total_bytes // 20)


@contextlib.contextmanager
def _nvml():
    """nvidia-ml-py, initialised, or None when it is not installed (an optional dependency,
    the `gpu` extra: imported here, where it is used) or no NVIDIA driver answers (pynvml
    raises NVMLError subclasses)."""
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


def detect_devices(indices: list[int] | None = None, use_torch: bool = False
                   ) -> list[DeviceSpec]:
    """The visible GPUs (NVML). `use_torch`: without NVML, ask torch (a run, whose CUDA is
    initialised anyway; `quantize plan` and launchers never do)."""
    found = [DeviceSpec(i, name, total, free) for i, name, total, free in gpu_memory(indices)]
    if found or not (use_torch and torch.cuda.is_available()):
        return found
    wanted = range(torch.cuda.device_count()) if indices is None else indices
    out = []
    for i in wanted:
        free, total = torch.cuda.mem_get_info(i)
        out.append(DeviceSpec(i, torch.cuda.get_device_name(i), int(total), int(free)))
    return out


def check_device(device: torch.device, flag: str = "--device", text: str | None = None) -> None:
    """A CUDA device is there (`text`: how the user spelled it, for the message)."""
    if device.type != "cuda":
        return
    text = text or str(device)
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise InputError(f"{flag} {text}: {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f"{flag} {text}: only {count} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{count - 1})")


def visible_gpu_memory() -> dict[int, int]:
    """{cuda index: total bytes} of the GPUs this process sees ({} without CUDA). From the
    driver (NVML) where it answers, so that checking a budget never initialises CUDA in a
    process that only launches others (or only plans)."""
    if not torch.cuda.is_available():
        return {}
    found = {index: total for index, _, total, _ in gpu_memory()}
    if len(found) == torch.cuda.device_count():
        return found
    return {i: torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())}


def default_vram_budgets(devices: list[DeviceSpec]) -> dict[int, int]:
    """Free memory as the driver reported it, minus a safety margin (vram_margin)."""
    return {d.index: max(0, d.free_bytes - vram_margin(d.total_bytes)) for d in devices}


def cap_to_cards(budgets: dict[int, int], devices: list[DeviceSpec]) -> tuple[dict, list]:
    """A budget a little above a card's memory ("80G" on an H100 80GB, which has 79.6 GiB) is
    the whole card: (budgets capped at each known card's total, a note per capped one).
    Larger ones were refused by the settings' validation (settings.Budgets.check_totals)."""
    totals = {d.index: d.total_bytes for d in devices if d.total_bytes}
    capped, notes = dict(budgets), []
    for i, b in budgets.items():
        if i in totals and b > totals[i]:
            capped[i] = totals[i]
            notes.append(f"--vram-budget {format_size(b)} is above cuda:{i}'s "
                         f"{format_size(totals[i])}: planning for the whole card")
    return capped, notes


def default_ram_budget() -> int:
    """Available host memory (psutil) minus max(1 GiB, 10%) for the OS and page cache."""
    available = psutil.virtual_memory().available
    return max(0, available - max(GIB, available // 10))


def gpu_budgets(budgets, indices: list[int], use_torch: bool = False
                ) -> tuple[list[DeviceSpec], dict[int, int], list[str]]:
    """The GPUs a plan is for, each one's budget (`budgets`: settings.Budgets) and notes: the
    given --vram-budget (one size for every GPU, or a list that must name each of `indices`;
    a little above a card is the whole card, cap_to_cards), else free memory less a margin,
    measured. Every rank of a multi-GPU run looks its own GPU up in the same parsed list, and
    `quantize plan` takes this same path."""
    detected = {d.index: d for d in detect_devices(use_torch=use_torch)}
    specs = [detected.get(i, DeviceSpec(i)) for i in indices]
    if budgets.vram:
        vram, notes = cap_to_cards({i: budgets.vram_for(i) for i in indices}, specs)
        return specs, vram, notes
    missing = [i for i in indices if i not in detected]
    if missing:
        raise InputError(f"no GPU {missing} visible to measure free memory; give --vram-budget")
    return specs, default_vram_budgets([detected[i] for i in indices]), []


def host_budget(budgets) -> int:
    """--ram-budget, else available host memory less a margin."""
    return budgets.ram if budgets.ram is not None else default_ram_budget()
