"""The memory planner: a pure function of model shapes × method × calibration size × devices ×
budgets → where everything lives, how large each forward chunk is, and the predicted peak.

This module is the planner (Plan, DevicePlan, PlanError, make_plan, shrink) and its refusals.
The parts live beside it: shapes.py (model shapes and the input groups of one layer), terms.py
and memory.py (the memory model: the bytes of each phase of a layer, with each method's own
terms from methods/<method>_memory.py), search.py (the walk from the fastest configuration
until the peak fits), format.py (the printed plan), apply.py (the plan of one run, and
`quantize plan`), machine.py (devices and default budgets)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import InputError, OutOfMemory
from .format import format_plan
from .machine import DeviceSpec
from .memory import CUDA_CONTEXT, Peak, device_peak, make_job, ram_peak
from .search import MOVES, apply_move, ram_ok, search
from .shapes import ModelShapes
from .sizes import format_size, format_size_up
from .terms import Decisions, HostFacts, Term

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
HIDDEN_PLACES = ("gpu", "cpu", "disk")


class PlanError(InputError):
    """No configuration fits: carries the smallest budget that would and what to change."""

    def __init__(self, message: str, needed: int = 0, culprit: str = ""):
        super().__init__(message)
        self.needed = needed
        self.culprit = culprit


@dataclass(frozen=True)
class DevicePlan:
    device: DeviceSpec
    budget: int
    decisions: Decisions
    predicted_peak: int
    breakdown: tuple[tuple[str, int], ...]  # the peak phase's terms; sums to predicted_peak
    peak_phase: str
    layers: tuple[int, ...] = ()
    steps: tuple[str, ...] = ()  # the moves taken from the fastest configuration, in order


@dataclass(frozen=True)
class Plan:
    shapes: ModelShapes
    method: str
    calib_samples: int
    calib_seqlen: int
    dtype_bytes: int
    devices: tuple[DevicePlan, ...]
    ram_budget: int
    ram_peak: int
    ram_breakdown: tuple[tuple[str, int], ...]
    forced: tuple[str, str] = ("auto", "auto")  # (hidden_device, hessian_device) as asked
    notes: tuple[str, ...] = field(default=(), compare=False)
    ram_phase: str = ""  # when host RAM peaks
    host: HostFacts | None = None  # what the host holds beside the layer (None: defaults)
    arch: object = field(default=None, compare=False)

    def job(self, device_plan: DevicePlan | None = None):
        """The planner's job of this plan (for a device's own view: its host flag)."""
        on_host = (device_plan or self.devices[0]).device.is_host
        return make_job(self.shapes, self.method, self.calib_samples, self.calib_seqlen,
                        self.dtype_bytes, on_host, self.forced, self.arch, self.host)

    @property
    def predicted_peak(self) -> dict[int, int]:
        return {dp.device.index: dp.predicted_peak for dp in self.devices}

    def device_plan_for(self, layer_index: int) -> DevicePlan:
        for dp in self.devices:
            if layer_index in dp.layers:
                return dp
        raise IndexError(f"layer {layer_index} is not in the plan "
                         f"({self.shapes.layers} layers)")

    def decisions_for(self, layer_index: int) -> Decisions:
        return self.device_plan_for(layer_index).decisions

    def format(self) -> str:
        return format_plan(self)


# ---------------------------------------------------------------- planning

_ADVICE = {
    "hessian": "try --hessian-device cpu (fewer calibration tokens do not shrink a Hessian)",
    "cholesky": "try --hessian-device cpu",
    "hidden": "try --hidden-device cpu (or disk), or fewer calibration tokens "
              "(--calib-samples / --calib-seqlen)",
    "reference": "try --hidden-device cpu, or fewer calibration tokens",
    "scores": "try a shorter --calib-seqlen (scores grow with its square)",
    "activations": "try a shorter --calib-seqlen",
    "weights": "modules are already streamed one at a time: a larger budget is the only fix",
    "context": "every GPU process pays this before any tensor: a larger budget is the only fix",
    "weight_fp32": "a larger budget",
}


def _culprit(peak: Peak, on_host: bool) -> Term:
    context = () if on_host else (Term("context", "the CUDA context and cuBLAS workspace",
                                       CUDA_CONTEXT),)
    return max(peak.terms + context, key=lambda t: t.bytes)


def _refusal(label: str, budget: int, peak: Peak, forced: tuple[str, str],
             ram_note: str = "", on_host: bool = False) -> PlanError:
    culprit = _culprit(peak, on_host)
    advice = _ADVICE.get(culprit.kind, "a larger budget")
    if culprit.kind in ("hessian", "cholesky") and (forced[1] == "cpu" or "host RAM" in ram_note):
        advice = "raise --ram-budget (Hessians on the CPU) or the VRAM budget"
    if culprit.kind in ("hidden", "reference") and forced[0] != "gpu":
        advice = "fewer calibration tokens (--calib-samples / --calib-seqlen)"
    label = "host RAM (--ram-budget)" if on_host else f"{label}'s"
    msg = (f"no plan fits {label} budget of {format_size(budget)}: needs ≥ "
           f"{format_size_up(peak.total)}: {culprit.label} ({format_size(culprit.bytes)}, "
           f"during {peak.phase}); {advice}{ram_note}")
    return PlanError(msg, needed=peak.total, culprit=culprit.label)


def _split_layers(n_layers: int, budgets: list[int]) -> list[tuple[int, ...]]:
    """Contiguous blocks of layers, sized in proportion to each device's budget."""
    total = sum(budgets)
    exact = [n_layers * b / total for b in budgets]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(budgets)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:n_layers - sum(counts)]:
        counts[i] += 1
    blocks, start = [], 0
    for c in counts:
        blocks.append(tuple(range(start, start + c)))
        start += c
    return blocks


def make_plan(shapes: ModelShapes, method: str, calib_samples: int, calib_seqlen: int,
              devices: list[DeviceSpec], vram_budgets: dict[int, int], ram_budget: int,
              dtype_bytes: int = 2, hidden_device: str = "auto", hessian_device: str = "auto",
              arch=None, host: HostFacts | None = None) -> Plan:
    """Pure: the same arguments always give an equal Plan; nothing is read or allocated.

    `devices` empty (or one DeviceSpec(-1)) plans for the host CPU with `ram_budget`.
    Raises PlanError (an InputError) when no configuration fits on any device."""
    _check_plan_args(method, calib_samples, calib_seqlen, dtype_bytes, hidden_device,
                     hessian_device)
    devices = list(devices) or [DeviceSpec(-1, "host")]
    on_host = all(dev.is_host for dev in devices)
    if not on_host and any(dev.is_host for dev in devices):
        raise InputError("plan either GPUs or the host CPU, not both at once")
    if on_host and hidden_device == "gpu":
        raise InputError("--hidden-device gpu with no GPU to plan for")
    forced = (hidden_device, hessian_device)
    job = make_job(shapes, method, calib_samples, calib_seqlen, dtype_bytes, on_host, forced,
                   arch, host)
    fitting, refusals = [], []
    for dev in devices:
        budget = ram_budget if dev.is_host else vram_budgets.get(dev.index)
        if budget is None:
            raise InputError(f"no VRAM budget for {dev.label}")
        dec, peak, steps, fits = search(job, budget, ram_budget)
        if fits:
            fitting.append((dev, budget, dec, peak, steps))
        else:
            refusals.append((dev, _device_refusal(job, dev, budget, dec, peak, ram_budget)))
    if not fitting:
        errors = [r for _, r in refusals]
        raise errors[0] if len(errors) == 1 else PlanError(
            "; ".join(str(r) for r in errors), needed=min(r.needed for r in errors),
            culprit=errors[0].culprit)
    blocks = _split_layers(shapes.layers, [b for _, b, *_ in fitting])
    plans = tuple(DevicePlan(dev, budget, dec, peak.total, peak.breakdown, peak.phase, block,
                             steps) for (dev, budget, dec, peak, steps), block
                  in zip(fitting, blocks))
    ram_items: tuple[tuple[str, int], ...]
    if on_host:
        ram_total, ram_phase, ram_items = plans[0].predicted_peak, plans[0].peak_phase, ()
    else:
        ram_total, ram_phase, ram_items = max(ram_peak(job, dp.decisions) for dp in plans)
    notes = tuple(f"{dev.label} left out: {r}" for dev, r in refusals)
    return Plan(shapes, method, calib_samples, calib_seqlen, dtype_bytes, plans, ram_budget,
                ram_total, ram_items, forced, notes, ram_phase, job.host, arch)


def _check_plan_args(method, calib_samples, calib_seqlen, dtype_bytes, hidden_device,
                     hessian_device) -> None:
    if method not in METHODS:
        raise InputError(f"planner: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method != "rtn" and (calib_samples < 1 or calib_seqlen < 1) or calib_samples < 0:
        raise InputError(f"{method} needs calibration samples and tokens, got "
                         f"{calib_samples} × {calib_seqlen}")
    if dtype_bytes not in (1, 2, 4):
        raise InputError(f"working dtype must be 1, 2 or 4 bytes, got {dtype_bytes}")
    if hidden_device not in ("auto",) + HIDDEN_PLACES:
        raise InputError(f"--hidden-device must be auto, gpu, cpu or disk, got {hidden_device!r}")
    if hessian_device not in ("auto", "gpu", "cpu"):
        raise InputError(f"--hessian-device must be auto, gpu or cpu, got {hessian_device!r}")


def _device_refusal(job, dev: DeviceSpec, budget: int, dec: Decisions, peak: Peak,
                    ram_budget: int) -> PlanError:
    """Why nothing fits `dev`: host RAM (the GPU would fit), or the device's own budget with
    the term that does not fit and what to change."""
    if peak.total <= budget and not job.on_host:  # the GPU fits; host RAM does not
        return _ram_refusal(job, dec, ram_budget)
    ram_note = "" if ram_ok(job, dec, ram_budget) else (
        f"; host RAM also short: needs {format_size_up(ram_peak(job, dec)[0])} of "
        f"{format_size(ram_budget)} (--ram-budget)")
    host = replace(dec, hessian="cpu", hidden="disk" if dec.hidden == "cpu" else dec.hidden)
    if (job.uses_gptq and dec.hessian in ("gpu", "park") and job.forced[1] == "auto"
            and not job.on_host and apply_move("hessian_off_gpu", job, dec, ram_budget) is None
            and device_peak(job, host).total < peak.total):  # blocked by host RAM
        ram_note = (f" — Hessians on the CPU would fit the GPU but need "
                    f"{format_size_up(ram_peak(job, host)[0])} of host RAM (--ram-budget "
                    f"is {format_size(ram_budget)}){ram_note}")
    return _refusal(dev.label, budget, peak, job.forced, ram_note, job.on_host)


def _ram_refusal(job, dec: Decisions, ram_budget: int) -> PlanError:
    total, phase, items = ram_peak(job, dec)
    label, size = max(items, key=lambda kv: kv[1])
    advice = {"the process": "a larger --ram-budget"}.get(label[:11], (
        "fewer calibration tokens (--calib-samples / --calib-seqlen)" if "hidden" in label
        or "AWQ" in label else "a larger --ram-budget"))
    return PlanError(f"host RAM: no plan fits --ram-budget {format_size(ram_budget)}: needs ≥ "
                     f"{format_size_up(total)} while it does {phase}: {label} "
                     f"({format_size(size)}); {advice}", needed=total, culprit=label)


# OOM recovery's moves that leave every number as it was: they only change where a tensor
# waits (hidden states in host RAM or on disk; a Hessian parked in host RAM during its solve).
# A halved chunk changes nothing on the CPU, but on a GPU the matmuls of a smaller batch may
# pick other kernels and round differently; Hessians solved on the CPU and row slices may too.
NEUTRAL_MOVES = ("hidden_off_gpu", "hessian_park")


def shrink(plan: Plan, layer_index: int, arch=None) -> Plan:
    """OOM recovery for the device that runs `layer_index` (and every later layer on it):
    first a move that cannot change the output (NEUTRAL_MOVES, in order); else halve the
    chunk; at chunk 1 the move that frees the most (Hessians to the CPU, more row slices).
    OutOfMemory when none is left. Moves the layer loop does not carry out (by_group) are not
    offered."""
    dp = plan.device_plan_for(layer_index)
    job = make_job(plan.shapes, plan.method, plan.calib_samples, plan.calib_seqlen,
                   plan.dtype_bytes, dp.device.is_host, plan.forced, arch, plan.host)
    dec = dp.decisions
    neutral = [(m, c) for m in NEUTRAL_MOVES if not dp.device.is_host
               for c in [apply_move(m, job, dec, plan.ram_budget)] if c is not None and c != dec]
    if neutral:
        new, step = neutral[0][1], f"oom: {neutral[0][0]}"
    elif dec.chunk > 1:
        new, step = replace(dec, chunk=dec.chunk // 2), "oom: chunk"
    else:
        sizes: dict[str, int] = {}
        for t in device_peak(job, dec).terms:
            sizes[t.kind] = sizes.get(t.kind, 0) + t.bytes
        options = []  # (bytes the move frees, move)
        for move, kinds in (("hidden_off_gpu", ("hidden", "reference")),
                            ("hessian_off_gpu", ("hessian", "cholesky")),
                            ("experts", ("hessian",)), ("row_slices", ("weight_fp32",))):
            if move not in MOVES:  # modelled, not carried out (by_group)
                continue
            cand = apply_move(move, job, dec, plan.ram_budget)
            if cand is not None and cand != dec:
                options.append((sum(sizes.get(k, 0) for k in kinds), move, cand))
        if not options:
            raise OutOfMemory(f"layer {layer_index} ran out of memory on {dp.device.label} at "
                              f"chunk 1 with nothing left to move off the GPU; predicted peak "
                              f"{format_size(dp.predicted_peak)} of {format_size(dp.budget)}")
        _, move, new = max(options, key=lambda o: o[0])
        step = f"oom: {move}"
    peak = device_peak(job, new)
    new_dp = replace(dp, decisions=new, predicted_peak=peak.total, breakdown=peak.breakdown,
                     peak_phase=peak.phase, steps=dp.steps + (step,))
    devices = tuple(new_dp if x is dp else x for x in plan.devices)
    note = f"layer {layer_index}: out of memory on {dp.device.label}; {step}"
    return replace(plan, devices=devices, notes=plan.notes + (note,))
