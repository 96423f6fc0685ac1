"""Plan the job, the first stage: everything decided before any weight is read (the checkpoint
opened and checked, the export format and its symmetric default, widths and group size, the
device and working dtype, the memory plan, the serving rules on the planned export), and
every refusal that can come before the job directory exists."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import InputError
from ..export import get_exporter
from ..export.serving import default_symmetric
from ..methods.registry import needs_calibration
from ..methods.context import LayerContext
from ..parallel.distributed import World, world
from ..plan.apply import cap_allocator, plan_for_run
from ..plan.machine import check_device, host_budget, visible_gpu_memory
from ..plan.planner import Plan
from ..plan.sizes import format_size_up
from ..plan.terms import Decisions
from ..settings import QuantSettings
from ..stream.inputs import check_calibration_length
from ..stream.originals import describe
from ..stream.skeleton import build_skeleton, check_layer_shapes
from ..stream.source import CheckpointSource
from .serving_checks import check_planned
from . import warmup
from .widths import plan_widths


@dataclass
class Job:
    """Everything decided before any weight is read."""

    source: CheckpointSource
    settings: QuantSettings  # validated, the symmetric default resolved for the format
    group_size: int
    intermediate: int
    padded_intermediate: int | None
    device: torch.device
    dtype: torch.dtype
    export_format: str
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None  # GPU runs; CPU runs with --ram-budget
    max_shard_bytes: int = 1 << 30  # the export's shards (a shard is written from RAM)
    skeleton: object = None  # the meta model, built and checked before the job directory

    def take_skeleton(self):
        """The skeleton prepare_skeleton built (once: the next pass builds its own)."""
        model, self.skeleton = self.skeleton, None
        return model

    @property
    def arch(self):
        return self.source.arch

    def method_settings(self) -> QuantSettings:
        """Settings as methods see them: the group size resolved to an integer."""
        return replace(self.settings, group_size=self.group_size)

    def layer_context(self, i: int, layer, model_config, inputs, kwargs, *, layout=None,
                      decisions: Decisions | None = None, arch=None) -> LayerContext:
        """What a method sees of decoder layer i (its module on the job's device, the
        calibration chunks entering it)."""
        return LayerContext(i, layer, arch or self.arch, model_config, self.method_settings(),
                            inputs, kwargs, self.device, self.dtype, layout=layout,
                            decisions=decisions)


def layer_decisions(plan: Plan | None, i: int, local: Decisions) -> Decisions:
    """Layer i's memory decisions: the plan's, or `local` (a run without a plan)."""
    dec = plan.decisions_for(i) if plan is not None else local
    if dec.hidden == "none":  # planned without calibration (RTN) yet given tokens
        dec = replace(dec, hidden="cpu")
    return dec


def local_decisions(settings: QuantSettings, device: torch.device) -> Decisions:
    """A run without a memory plan (CPU without --ram-budget): its settings say where hidden
    states wait and how large a chunk is."""
    hidden = {"disk": "disk", "gpu": "gpu"}.get(settings.hidden_device, "cpu")
    if device.type != "cuda" and hidden == "gpu":
        hidden = "cpu"
    return Decisions(hidden=hidden, hessian="gpu", mode="whole",
                     chunk=max(1, settings.chunk_size))


# ---- the stage ----------------------------------------------------------------------------
def plan_job(model_path, settings: QuantSettings, max_shard_bytes: int = 1 << 30,
             w: World | None = None) -> Job:
    """Validate, open the checkpoint, decide the export and the plan; refuse in one line
    before anything is written."""
    w = w or world()
    settings = settings.validated()
    device = run_device(settings, w)
    warmup.start(device)  # CUDA, cuBLAS, cuSOLVER, Triton: on a thread beside the imports
    check_placement(settings, device, w)
    source = CheckpointSource(model_path, originals=True)  # refuses what it cannot read
    check_calibration_length(source.raw_config, settings.calib.seqlen, settings.calib.samples)
    fmt = export_format(settings)
    if settings.symmetric is None:  # the default: what the format's fast serving path takes
        settings = replace(settings, symmetric=default_symmetric(fmt))
    if not settings.is_adaptive:
        get_exporter(fmt).check_supported(settings.bits, settings.symmetric,
                                          bool(settings.gptq.act_order) if fmt != "awq"
                                          else writes_g_idx(settings))
    widths = plan_widths(source, settings)
    notes = ([describe(source.original, len(source.quantized_names()))]
             if source.original is not None else []) + widths.notes
    dtype = working_dtype(settings, device, config_dtype(source.raw_config))
    job = Job(source, settings, widths.group_size, widths.intermediate, widths.padded,
              device, dtype, fmt, notes, max_shard_bytes=max_shard_bytes)
    if not settings.is_adaptive:  # adaptive: checked once the bit allocation is known
        check_planned(job)
    if device.type == "cuda":
        warmup.wait()  # the plan reads free memory: after the warm-up let go of its own
    job.plan, plan_notes = plan_for_run(job)
    job.notes += plan_notes
    if job.plan is not None and settings.budgets.vram and device.type == "cuda":
        job.notes.append(cap_allocator(device.index, job.plan.devices[0].budget))
    if job.plan is None:  # a CPU run without --ram-budget keeps hidden states in RAM
        check_host_memory(job)
    return job


def export_format(settings: QuantSettings) -> str:
    """The export format: adaptive runs write compressed-tensors (mixed widths); otherwise
    --format, or what vLLM serves for each: AWQ GEMM for 4-bit, else GPTQ / CT."""
    fmt = settings.export_format
    if settings.is_adaptive:
        if settings.method != "gptq":
            raise InputError(f"fractional --bits / --measurement need --method gptq (adaptive "
                             f"GPTQ), got --method {settings.method}")
        if fmt not in ("auto", "compressed-tensors"):
            raise InputError("mixed bit widths are exported as compressed-tensors only "
                             f"(got --format {fmt})")
        return "compressed-tensors"
    if fmt != "auto":
        return fmt
    return ("gptq" if settings.method == "gptq" or (settings.method == "awq-gptq"
                                                    and writes_g_idx(settings)) else
            "awq" if settings.bits == 4 else "compressed-tensors")


def writes_g_idx(settings: QuantSettings) -> bool:
    """Act-order without static groups writes a g_idx, which the AWQ layout cannot hold."""
    return bool(settings.gptq.act_order) and not settings.gptq.static_groups


def run_device(settings: QuantSettings, w: World) -> torch.device:
    """This process's device: its rank's under torch.distributed, else --device (auto: a
    visible GPU, else the CPU); a GPU always with its index."""
    if w.distributed:
        return w.device
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_placement(settings: QuantSettings, device: torch.device, w: World) -> None:
    """What needs the machine, before any directory exists: the CUDA device is there, a
    budget is not beyond its GPU and names the GPUs in use, a multi-process run can do it."""
    check_device(device, text=settings.device if not w.distributed else None)
    settings.budgets.check_totals(visible_gpu_memory())
    settings.budgets.check_gpus(_gpus_in_use(settings, device, w))
    if w.distributed:
        check_distributed(settings, w.size)


def _gpus_in_use(settings: QuantSettings, device: torch.device, w: World) -> list[int] | None:
    """Every GPU of this run when known (all ranks' under --devices; one process: its own);
    None when each rank knows only its own (torchrun without --devices)."""
    if settings.devices:
        gpus = [int(d.split(":")[1]) for d in settings.devices if d.startswith("cuda:")]
        return gpus or None
    if w.distributed:
        return None
    return [device.index] if device.type == "cuda" else None


def check_distributed(settings: QuantSettings, processes: int) -> None:
    """What a multi-process run cannot do: refuse before any work."""
    if settings.is_adaptive:
        raise InputError("adaptive bit allocation (--bits 4.5, --adaptive, --measurement) "
                         "runs on one device only; drop --devices")
    shards = min(settings.calib.shards, max(settings.calib.samples, 1))
    assert settings.method is not None  # validated settings name their method
    if needs_calibration(settings.method) and processes > shards:
        raise InputError(f"{processes} processes but only {shards} calibration shards "
                         f"(--calib-shards {settings.calib.shards}, --calib-samples "
                         f"{settings.calib.samples}): each process needs a shard; use at most "
                         f"{shards} devices")


def config_dtype(cfg: dict) -> torch.dtype:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, d, torch.float32)


def working_dtype(settings: QuantSettings, device: torch.device,
                  model_dtype: torch.dtype | None) -> torch.dtype:
    """--dtype, or auto: float32 on the CPU (half matmuls there are slow and sometimes
    missing), the model's fp16/bf16 on a GPU (else fp16)."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if device.type == "cpu":
        return torch.float32
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def check_host_memory(job: Job) -> None:
    """Without a GPU plan the calibration hidden states wait in host memory, a layer's inputs
    beside its outputs: refuse before any work when they cannot fit (a 100k-token
    --calib-seqlen was a killed run, not a refusal)."""
    s = job.settings
    if s.calib.samples <= 0 or s.hidden_device == "disk":
        return
    hidden = int(job.source.raw_config.get("hidden_size") or 0)
    need = 2 * s.calib.samples * s.calib.seqlen * hidden * (torch.finfo(job.dtype).bits // 8)
    budget = host_budget(s.budgets)
    if need > budget:
        have = (f"--ram-budget {s.budgets.ram_text}" if s.budgets.ram is not None
                else "available host memory")
        raise InputError(f"--calib-samples {s.calib.samples} x --calib-seqlen {s.calib.seqlen} "
                         f"needs {format_size_up(need)} of host memory for the calibration "
                         f"hidden states, more than the {format_size_up(budget)} of {have}: "
                         f"use fewer samples, a shorter --calib-seqlen, --hidden-device disk, or "
                         f"--ram-budget (the host plan then moves them to disk)")


def prepare_skeleton(job: Job) -> None:
    """Build transformers' model of this config (meta layers; embeddings and head read) and
    check every layer's weights against it: a weight whose shape disagrees with config.json
    is refused in one line before the job directory exists, not at its layer."""
    job.skeleton = build_skeleton(job.source, "cpu", job.dtype, job.padded_intermediate)
    check_layer_shapes(job.skeleton, job.source, job.intermediate, job.padded_intermediate)


__all__ = ["Job", "plan_job", "prepare_skeleton", "export_format", "run_device",
           "check_placement", "working_dtype", "local_decisions", "layer_decisions"]
