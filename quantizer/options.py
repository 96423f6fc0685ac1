"""Method options: which method takes which option, its type, range and command-line flag.

One table, read by the settings' validation before any file or directory is made, so that
`--method awq --damp 0.05` or `--awq-grid 0` is one line naming the option (exit 2), never a
TypeError from inside a method after the job directory exists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import InputError


@dataclass(frozen=True)
class Option:
    flag: str                      # how the user spells it on the command line
    methods: tuple[str, ...]       # the methods that take it
    kind: type                     # bool, int, float or str
    check: Callable[[Any], bool] = lambda v: True
    rule: str = ""                 # what `check` demands, for the refusal


_GPTQ = ("gptq", "awq-gptq")  # awq-gptq: AWQ's scales, then GPTQ (methods/awq_gptq.py)
_AWQ_SCALES = ("awq", "awq-gptq")
_ALL = ("rtn", "awq", "gptq", "awq-gptq")

OPTIONS: dict[str, Option] = {
    "damp": Option("--damp", _GPTQ, float, lambda v: 0 < v < 1, "in (0, 1)"),
    "act_order": Option("--act-order", _GPTQ, bool),
    "static_groups": Option("--static-groups", _GPTQ, bool),
    "block": Option("block", _GPTQ, int, lambda v: v >= 1, "a positive integer"),
    "error_weights": Option("--error-weights", ("gptq",), str,
                            lambda v: v in ("none", "residual"), "none or residual"),
    "report_error": Option("report_error", _GPTQ, bool),
    "module_settings": Option("module_settings", _GPTQ, dict),
    "grid": Option("--awq-grid", _AWQ_SCALES, int, lambda v: v >= 1, "a positive integer"),
    "clip": Option("--awq-no-clip", ("awq",), bool),
    "duo_scaling": Option("--awq-no-duo-scaling", _AWQ_SCALES, bool),
    "clip_grid": Option("clip_grid", ("awq",), int, lambda v: v >= 1, "a positive integer"),
    "max_shrink": Option("max_shrink", ("awq",), float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip_tokens": Option("clip_tokens", ("awq",), int, lambda v: v >= 1, "a positive integer"),
    "rtn_baseline": Option("rtn_baseline", _AWQ_SCALES, bool),
    "keep_identity": Option("keep_identity", _AWQ_SCALES, bool),
    "cache_device": Option("cache_device", _AWQ_SCALES, str,
                           lambda v: v in ("auto", "device", "cpu"), "auto, device or cpu"),
    "weighted_stat": Option("weighted_stat", _AWQ_SCALES, bool),
    # how each group's scale and zero are chosen (methods/grid.py)
    "scale_search": Option("--scale-search", _ALL, str,
                           lambda v: v in ("minmax", "mse", "imatrix"), "minmax, mse or imatrix"),
    # how calibration tokens weigh (methods/token_weights.py)
    "token_weights": Option("--token-weights", _ALL, str,
                            lambda v: v in ("none", "outliers", "residual", "residual-in"),
                            "none, outliers, residual or residual-in"),
}


def _typed(name: str, opt: Option, value):
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{opt.flag} must be true or false, got {value!r}")
        return value
    if opt.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                opt.kind is int and not float(value).is_integer()):
            raise InputError(f"{opt.flag} must be {'an integer' if opt.kind is int else 'a number'}"
                             f", got {value!r}")
        value = opt.kind(value)
        if value != value:  # NaN
            raise InputError(f"{opt.flag} must be a number, got {value!r}")
    elif not isinstance(value, opt.kind):
        raise InputError(f"{opt.flag} must be a {opt.kind.__name__}, got {value!r}")
    if not opt.check(value):
        raise InputError(f"{opt.flag} must be {opt.rule}, got {value!r}")
    return value


def check_method_options(method: str, options: dict) -> dict:
    """The options with their values typed; refuses unknown options, options of another method
    and values out of range, naming the option as the user spelled it."""
    out = {}
    for name, value in options.items():
        opt = OPTIONS.get(name)
        if opt is None:
            known = ", ".join(sorted(k for k, o in OPTIONS.items() if method in o.methods))
            raise InputError(f"unknown option {name!r} for --method {method}"
                             + (f" (it takes: {known})" if known else " (it takes none)"))
        if method not in opt.methods:
            raise InputError(f"{opt.flag} applies to --method {' / '.join(opt.methods)} only, "
                             f"not --method {method}")
        out[name] = _typed(name, opt, value)
    return out


# ---- run settings ---------------------------------------------------------------------------
# The settings of a run other than the method's, with their allowed values; QuantSettings.
# validate() checks them all before any file or directory is made, whatever the device (a
# budget is checked on a machine without a GPU too), and `quantize plan` checks its own.
DTYPES = ("auto", "float16", "bfloat16", "float32")
HESSIAN_DEVICES = ("auto", "gpu", "cpu")
HIDDEN_DEVICES = ("auto", "gpu", "cpu", "disk")
SAVE_HIDDEN = ("auto", "always", "never")
EXPORT_FORMATS = ("auto", "awq", "gptq", "compressed-tensors")
OUT_DTYPES = ("float16", "bfloat16")
MIN_BITS, MAX_BITS = 2, 8
# Below these nothing can run: a CUDA context alone takes ~0.9 GiB of a GPU, a Python
# process with torch ~0.3 GiB of host memory; no GPU has 1 TiB. Between them and what a run
# needs, the memory planner refuses with the smallest budget that works.
MIN_BUDGET = 1 << 30
MIN_RAM_BUDGET = 256 << 20
MAX_GPU_MEMORY = 1 << 40
MAX_HOST_MEMORY = 1 << 46  # 64 TiB: only nonsense is refused (a plan may be for another host)


def check_choice(flag: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def check_int(flag: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{flag} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")
    return value


def check_bits(value, adaptive: bool):
    """A finite number of bits per weight in [2, 8]; an int when it is one. Adaptive targets
    must be above 2: every measured candidate stores at least 2-bit codes plus scales."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise InputError(f"--bits must be a number between {MIN_BITS} and {MAX_BITS}, "
                         f"got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise InputError(f"--bits must be between {MIN_BITS} and {MAX_BITS}, got {value:g}")
    if float(value).is_integer():
        value = int(value)
    if (adaptive or isinstance(value, float)) and value <= MIN_BITS:
        raise InputError(f"adaptive --bits {value:g} is not above {MIN_BITS}: every candidate "
                         f"stores 2-bit codes plus scales; choose a target above {MIN_BITS}")
    return value


def check_device(text, flag: str = "--device") -> None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only when one is visible."""
    import torch
    if text == "auto":
        return
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{flag} must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise InputError(f"{flag} {text}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise InputError(f"{flag} {text}: {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise InputError(f"{flag} {text}: only {count} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{count - 1})")


def visible_gpu_memory() -> dict[int, int]:
    """{cuda index: total bytes} of the GPUs this process sees ({} without CUDA). From the
    driver (NVML) where it answers, so that checking a budget never initialises CUDA in a
    process that only launches others (or only plans)."""
    import torch

    from .plan.sizes import gpu_memory
    if not torch.cuda.is_available():
        return {}
    found = {index: total for index, _, total, _ in gpu_memory()}
    if len(found) == torch.cuda.device_count():
        return found
    return {i: torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())}


CARD_SLACK = 1.1  # a budget up to 10% above a card's memory means the whole card


def check_vram_budget(text, gpus: dict[int, int]) -> None:
    """--vram-budget: a size ("40G") or DEVICE:SIZE list, each at least 1 GiB and at most what
    its GPU has (`gpus`: {index: total bytes} of the visible ones; none: at most 1 TiB)."""
    from .plan.sizes import format_size, parse_budgets, parse_size
    if text is None:
        return
    flag = "--vram-budget"
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{flag} must be a size such as 40G or 0:20G,1:40G, got {text!r}")
    try:
        sizes = (parse_budgets(text) if ":" in text else {None: parse_size(text)})
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    for index, size in sizes.items():
        if gpus and index is not None and index not in gpus:
            raise InputError(f"{flag} {text}: there is no cuda:{index} (visible: "
                             f"{', '.join(f'cuda:{i}' for i in sorted(gpus))})")
        _check_range(flag, text, size, MIN_BUDGET, "(a CUDA context alone takes ~0.9 GiB)")
        if not gpus and size > MAX_GPU_MEMORY:
            raise InputError(f"{flag} {text} is more than any GPU's memory (none has 1 TiB)")
        for i in ([index] if index is not None and gpus else sorted(gpus)):
            # A little above the card is the whole card ("80G" on an H100 80GB: 79.6 GiB;
            # the planner caps it, plan.cap_to_cards); far above is a mistake.
            if size > gpus[i] * CARD_SLACK:
                raise InputError(f"{flag} {text} is more than the GPU's memory (cuda:{i} has "
                                 f"{format_size(gpus[i])})")


def check_ram_budget(text) -> None:
    """--ram-budget: a size of at least 256 MiB (and not beyond any machine: 64 TiB). More than
    this machine has is allowed: a plan may be for another machine, and a budget above what
    is here simply does not bind."""
    from .plan.sizes import parse_size
    if text is None:
        return
    flag = "--ram-budget"
    try:
        size = parse_size(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    _check_range(flag, text, size, MIN_RAM_BUDGET, "(a process with torch alone takes more)")
    if size > MAX_HOST_MEMORY:
        raise InputError(f"{flag} {text} is not a memory size any machine has")


def _check_range(flag: str, text, size: int, minimum: int, why: str) -> None:
    from .plan.sizes import format_size
    if size < minimum:
        raise InputError(f"{flag} {text} is less than {format_size(minimum)} {why}")


def check_positive_size(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag} must be a positive size such as 1G or 500M, got {value!r}")
