"""The memory plan applied to one run: the plan for the run's device (refusing before any
work when nothing fits), the settings it decides, and an explicit --vram-budget made binding
on torch's allocator. The planner itself (a pure function) is quantizer/plan.py."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

CARRIED_OUT = {"hidden": ("gpu", "cpu", "disk"), "hessian": ("gpu", "park", "cpu", "none"),
               "mode": ("whole",)}


def plan_memory(job):  # job: quantizer.run.pipeline.Job
    """The memory plan for this run (refuses before any work when nothing fits). The layer
    loop runs each layer with its device's decisions: chunk size, where hidden states wait,
    where GPTQ's Hessians live, row slices of the solve. A GPU run always has one; a CPU run
    has one when --ram-budget is given (the host is then the device: every term of the
    plan is host memory), else it keeps its settings (chunk, hidden placement) as before."""
    from .sizes import default_ram_budget, parse_budgets, parse_size
    from .planner import (DeviceSpec, ModelShapes, cap_to_cards, default_vram_budgets,
                          detect_devices, make_plan)

    s = job.settings
    on_cpu = job.device.type == "cpu"
    if on_cpu and not s.ram_budget:
        return None
    if on_cpu:
        index, devices, budgets = -1, [DeviceSpec(-1, "host")], {}
    else:
        index = job.device.index if job.device.index is not None else \
            torch.cuda.current_device()
        devices = [d for d in detect_devices([index]) if d.index == index] or [
            DeviceSpec(index)]
        budgets = (parse_budgets(s.vram_budget, [index]) if s.vram_budget
                   else default_vram_budgets(devices))
        budgets, capped = cap_to_cards(budgets, devices)
        job.notes.extend(capped)
    ram = parse_size(s.ram_budget) if s.ram_budget else default_ram_budget()
    method = s.method if s.method in ("rtn", "awq", "gptq", "awq-gptq") else "gptq"
    samples = max(s.calib.samples, 0 if method == "rtn" else 1)
    hidden = {"cuda": "gpu", "cpu": "cpu"}.get(s.hidden_device, s.hidden_device)
    shapes = ModelShapes.from_config(job.source.raw_config)
    d = torch.finfo(job.dtype).bits // 8
    plan = make_plan(shapes, method, samples, s.calib.seqlen, devices, budgets, ram, d,
                     hidden if hidden in ("gpu", "cpu", "disk") else "auto", s.hessian_device,
                     arch=job.arch, host=run_host_facts(job, shapes, d, on_cpu))
    dec = plan.decisions_for(0)
    s.chunk_size = dec.chunk
    s.hidden_device = {"gpu": str(job.device)}.get(dec.hidden, dec.hidden)
    unsupported = [f"{k}={getattr(dec, k)}" for k, ok in CARRIED_OUT.items()
                   if getattr(dec, k) not in ok]
    where = "host RAM" if on_cpu else str(job.device)
    budget = ram if on_cpu else budgets[index]
    job.notes.append(f"memory plan: predicted peak {plan.predicted_peak[index] / 2**30:.2f} GiB "
                     f"of {budget / 2**30:.2f} GiB on {where}; chunk {dec.chunk} "
                     f"samples, hidden states on {dec.hidden}, Hessians {dec.hessian}, "
                     f"row slices {dec.row_slices}"
                     + ("" if on_cpu else f"; host RAM {plan.ram_peak / 2**30:.2f} GiB of "
                        f"{ram / 2**30:.2f} GiB"))
    if unsupported:
        job.notes.append("the plan also asks for " + ", ".join(unsupported) + ", which this "
                         "version does not carry out: the measured peak may exceed it")
    if s.vram_budget and not on_cpu:
        job.notes.append(cap_allocator(index, budgets[index]))
    return plan


def run_host_facts(job, shapes, dtype_bytes: int, on_cpu: bool):
    """What this run's host holds beside a layer (plan_memory.HostFacts): this process as it
    is now (measured) plus the CUDA runtime still to come on a GPU, the checkpoint's stored
    bytes per layer weight (a quantized original's, measured on one layer of each kind), the
    export's, its shard size, and whether hidden states are checkpointed from RAM."""
    import math

    import psutil

    from .memory import CUDA_HOST, IMPORT_MARGIN, host_facts

    s = job.settings
    source = job.source
    base = psutil.Process().memory_info().rss + IMPORT_MARGIN + (0 if on_cpu else CUDA_HOST)
    hidden_bytes = max(s.calib.samples, 0) * s.calib.seqlen * shapes.hidden * dtype_bytes
    save = s.save_hidden == "always" or (s.save_hidden == "auto" and on_cpu
                                         and hidden_bytes <= s.save_hidden_max_bytes)
    facts = host_facts(shapes, dtype_bytes, on_cpu, source.raw_config, float(s.bits),
                       job.group_size, getattr(job, "max_shard_bytes", 1 << 30), base, save)
    stored = 0.0
    for i in source.arch.representative_layers(source.raw_config):
        names = source.layer_names(i)
        elements = sum(math.prod(source.shape(n)) for n in names)
        stored = max(stored, source.stored_bytes(names) / max(1, elements))
    from dataclasses import replace
    return replace(facts, stored_per_weight=stored or facts.stored_per_weight)


def cap_allocator(index: int, budget: int) -> str:
    """Make an explicit --vram-budget binding: torch's caching allocator may reserve at most
    the budget less the CUDA context (which it never sees), so a layer that would exceed it
    raises OutOfMemoryError there and OOM recovery shrinks it, instead of the run quietly
    using memory the user gave to something else."""
    from .planner import CUDA_CONTEXT

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
