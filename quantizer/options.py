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


OPTIONS: dict[str, Option] = {
    "damp": Option("--damp", ("gptq",), float, lambda v: 0 < v < 1, "in (0, 1)"),
    "act_order": Option("--act-order", ("gptq",), bool),
    "static_groups": Option("--static-groups", ("gptq",), bool),
    "block": Option("block", ("gptq",), int, lambda v: v >= 1, "a positive integer"),
    "error_weights": Option("--error-weights", ("gptq",), str,
                            lambda v: v in ("none", "residual"), "none or residual"),
    "report_error": Option("report_error", ("gptq",), bool),
    "module_settings": Option("module_settings", ("gptq",), dict),
    "grid": Option("--awq-grid", ("awq",), int, lambda v: v >= 1, "a positive integer"),
    "clip": Option("--awq-no-clip", ("awq",), bool),
    "duo_scaling": Option("--awq-no-duo-scaling", ("awq",), bool),
    "clip_grid": Option("clip_grid", ("awq",), int, lambda v: v >= 1, "a positive integer"),
    "max_shrink": Option("max_shrink", ("awq",), float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip_tokens": Option("clip_tokens", ("awq",), int, lambda v: v >= 1, "a positive integer"),
    "rtn_baseline": Option("rtn_baseline", ("awq",), bool),
    "keep_identity": Option("keep_identity", ("awq",), bool),
    "cache_device": Option("cache_device", ("awq",), str,
                           lambda v: v in ("auto", "device", "cpu"), "auto, device or cpu"),
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
