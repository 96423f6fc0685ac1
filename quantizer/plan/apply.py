"""The memory plan of one set of settings, by one path for a run (`plan_for_run`) and for
`quantize plan` (`plan_command`): the same method, working dtype, calibration, placement and
budgets (settings.Budgets, parsed once; machine.gpu_budgets and host_budget). Also an explicit
--vram-budget made binding on torch's allocator (`cap_allocator`). The planner itself (a pure
function) is planner.make_plan."""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import replace

import psutil
import torch

from ..stream.source import read_config
from .machine import HOST, DeviceSpec, detect_devices, gpu_budgets, host_budget
from .memory import CUDA_CONTEXT, IMPORT_MARGIN, host_facts
from .planner import Plan, make_plan
from .shapes import ModelShapes
from .terms import CUDA_HOST, HostFacts

# Decisions of the planner this version carries out (the planner's search and OOM recovery
# take no other moves); a plan asking for more is reported, never silently dropped.
CARRIED_OUT = {"hidden": ("gpu", "cpu", "disk"), "hessian": ("gpu", "park", "cpu", "none"),
               "mode": ("whole",)}
# `quantize plan`'s group size for --group-size auto: what a run picks on real widths
PLAN_AUTO_GROUP_SIZE = 128


def plan_settings(settings, shapes: ModelShapes, devices: list[DeviceSpec],
                  vram: dict[int, int], ram: int, dtype_bytes: int, arch, host: HostFacts
                  ) -> Plan:
    """The planner on validated settings: their method, calibration and placement."""
    samples = max(settings.calib.samples, 0 if settings.method == "rtn" else 1)
    return make_plan(shapes, settings.method, samples, settings.calib.seqlen, devices, vram,
                     ram, dtype_bytes, settings.hidden_device, settings.hessian_device,
                     arch=arch, host=host)


def plan_for_run(job) -> tuple[Plan | None, list[str]]:
    """The memory plan of a run (job: run.job.Job) and its notes; refuses before any work
    when nothing fits. The layer loop runs each layer with its device's decisions: chunk
    size, where hidden states wait, where GPTQ's Hessians live, row slices of the solve. A
    GPU run always has one; a CPU run has one when --ram-budget is given (the host is then
    the device: every term of the plan is host memory), else it keeps its settings (chunk,
    hidden placement) and has none."""
    s = job.settings
    on_cpu = job.device.type == "cpu"
    if on_cpu and s.budgets.ram is None:
        return None, []
    capped: list[str] = []
    vram: dict[int, int]
    if on_cpu:
        devices, vram = [HOST], {}
    else:
        devices, vram, capped = gpu_budgets(s.budgets, [job.device.index], use_torch=True)
    ram = host_budget(s.budgets)
    shapes = ModelShapes.from_config(job.source.raw_config)
    d = torch.finfo(job.dtype).bits // 8
    plan = plan_settings(s, shapes, devices, vram, ram, d, job.arch,
                         run_host_facts(job, shapes, d, on_cpu))
    budget = ram if on_cpu else vram[job.device.index]
    return plan, capped + _plan_notes(plan, job.device, budget, ram, on_cpu)


def _plan_notes(plan: Plan, device: torch.device, budget: int, ram: int, on_cpu: bool
                ) -> list[str]:
    dp = plan.devices[0]
    dec = dp.decisions
    where = "host RAM" if on_cpu else str(device)
    notes = [f"memory plan: predicted peak {dp.predicted_peak / 2**30:.2f} GiB of "
             f"{budget / 2**30:.2f} GiB on {where}; chunk {dec.chunk} samples, hidden states on "
             f"{dec.hidden}, Hessians {dec.hessian}, row slices {dec.row_slices}"
             + ("" if on_cpu else f"; host RAM {plan.ram_peak / 2**30:.2f} GiB of "
                f"{ram / 2**30:.2f} GiB")]
    unsupported = [f"{k}={getattr(dec, k)}" for k, ok in CARRIED_OUT.items()
                   if getattr(dec, k) not in ok]
    if unsupported:
        notes.append("the plan also asks for " + ", ".join(unsupported) + ", which this "
                     "version does not carry out: the measured peak may exceed it")
    return notes


def run_host_facts(job, shapes: ModelShapes, dtype_bytes: int, on_cpu: bool) -> HostFacts:
    """What this run's host holds beside a layer (terms.HostFacts): this process as it is now
    (measured) plus the CUDA runtime still to come on a GPU, the checkpoint's stored bytes per
    layer weight (a quantized original's, measured on one layer of each kind), the export's,
    its shard size, and whether hidden states are checkpointed from RAM."""
    s = job.settings
    source = job.source
    base = psutil.Process().memory_info().rss + IMPORT_MARGIN + (0 if on_cpu else CUDA_HOST)
    hidden_bytes = max(s.calib.samples, 0) * s.calib.seqlen * shapes.hidden * dtype_bytes
    save = s.save_hidden == "always" or (s.save_hidden == "auto" and on_cpu
                                         and hidden_bytes <= s.save_hidden_max_bytes)
    facts = host_facts(shapes, dtype_bytes, on_cpu, source.raw_config, float(s.bits),
                       job.group_size, job.max_shard_bytes, base, save)
    stored = 0.0
    for i in source.arch.representative_layers(source.raw_config):
        names = source.layer_names(i)
        elements = sum(math.prod(source.shape(n)) for n in names)
        stored = max(stored, source.stored_bytes(names) / max(1, elements))
    return replace(facts, stored_per_weight=stored or facts.stored_per_weight)


# ---- `quantize plan` ----------------------------------------------------------------------
def plan_gpus(budgets, devices: list[int] | None) -> list[int]:
    """The GPUs `quantize plan` plans for: those named, else the visible ones; with a budget
    but no GPU here, those the budget names (or cuda:0), as on the machine that will run it."""
    if devices:
        return list(devices)
    visible = sorted(d.index for d in detect_devices())
    if visible or not budgets.vram:
        return visible
    return budgets.named_gpus() or [0]


def plan_dtype_bytes(settings, on_host: bool) -> int:
    """The working dtype a run would take (run.job.working_dtype): float32 on the host, the
    model's fp16/bf16 on a GPU (else fp16), unless --dtype says."""
    if settings.dtype != "auto":
        return torch.finfo(getattr(torch, settings.dtype)).bits // 8
    return 4 if on_host else 2


def plan_group_size(settings) -> int:
    """The group size `quantize plan` plans for: the settings' (auto: 128)."""
    return PLAN_AUTO_GROUP_SIZE if settings.group_size == "auto" else int(settings.group_size)


def plan_command(model_dir_or_config, settings, devices: list[int] | None = None) -> str:
    """`quantize plan MODEL --bits 4 --vram-budget 16G`: reads config.json only (no weights)
    and returns the formatted plan for validated `settings` (the run's defaults: method,
    dtype, calibration). `devices`: GPU indices (default: the visible ones)."""
    config = (model_dir_or_config if isinstance(model_dir_or_config, dict)
              else read_config(model_dir_or_config))
    shapes = ModelShapes.from_config(config)
    wanted = plan_gpus(settings.budgets, devices)
    specs, vram, capped = gpu_budgets(settings.budgets, wanted) if wanted else ([], {}, [])
    settings.budgets.check_gpus(wanted or None)
    d = plan_dtype_bytes(settings, not specs)
    group_size = plan_group_size(settings)
    host = host_facts(shapes, d, not specs, config, float(settings.bits), group_size)
    plan = plan_settings(settings, shapes, specs, vram, host_budget(settings.budgets), d,
                         None, host)
    return "\n".join([f"{settings.bits:g}-bit {settings.method}, group size {group_size}",
                      *capped, plan.format()])


# ---- the allocator ------------------------------------------------------------------------
def cap_allocator(index: int, budget: int) -> str:
    """Make an explicit --vram-budget binding: torch's caching allocator may reserve at most
    the budget less the CUDA context (which it never sees), so a layer that would exceed it
    raises OutOfMemoryError there and OOM recovery shrinks it, instead of the run quietly
    using memory the user gave to something else."""
    total = torch.cuda.get_device_properties(index).total_memory
    # Under a cap, fragmentation decides whether a plan fits: n×n Hessians, their factors and
    # layer weights of many sizes leave reserved-but-unusable holes. Expandable segments let
    # freed blocks merge (when the allocator has not been configured by the user).
    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        _expandable_segments()
    fraction = min(1.0, max(budget - CUDA_CONTEXT, 1) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return (f"allocator capped at {fraction * total / 2**30:.2f} GiB on cuda:{index} "
            f"(--vram-budget less the CUDA context)")


def _expandable_segments() -> None:
    """A private torch API that moved between versions; a no-op where neither exists."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setter is not None:
            setter("expandable_segments:True")
        else:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
