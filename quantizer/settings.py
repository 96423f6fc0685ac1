"""Every setting of a run, typed, each with its one default and its rules (issue 18).

`QuantSettings` is built by the command line (cli/args.py) or by the API (from keywords, or
given whole), validated by `validated()` before any file or directory exists, and handed
unchanged to every stage and to distributed workers. Method options are typed too:
`GPTQOptions` and `AWQOptions`, whose fields carry the flag, the methods that take the option
and its rule, so that `--method awq --damp 0.05` or `--awq-grid 0` is one line naming the option.
`Budgets` are --vram-budget / --ram-budget parsed once. `OutputSettings` say where a run writes
and what it may replace.

Pure: no torch here. What needs the machine (is cuda:1 there, does a budget exceed its GPU)
is checked by run.job.check_placement, also before any directory exists."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import InputError
from .plan.sizes import format_size, parse_budgets, parse_size

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
DTYPES = ("auto", "float16", "bfloat16", "float32")
HESSIAN_DEVICES = ("auto", "gpu", "cpu")
HIDDEN_DEVICES = ("auto", "gpu", "cpu", "disk")
SAVE_HIDDEN = ("auto", "always", "never")
EXPORT_FORMATS = ("auto", "awq", "gptq", "compressed-tensors")
OUT_DTYPES = ("float16", "bfloat16")
ENGINES = ("vllm", "none")
# How adaptive GPTQ's bit allocation weighs each group's measured (block output) error:
# "none" by default; "residual" by its block's share of the residual stream, which helped on
# stories260K but hurt on SmolLM2, whose massive activations make every middle layer's share
# tiny (benchmarks/results/quality_gpu_s5.md)
ERROR_WEIGHTS = ("none", "residual")
MIN_BITS, MAX_BITS = 2, 8
# Below these nothing can run: a CUDA context alone takes ~0.9 GiB of a GPU, a Python
# process with torch ~0.3 GiB of host memory; no GPU has 1 TiB. Between them and what a run
# needs, the memory planner refuses with the smallest budget that works.
MIN_BUDGET = 1 << 30
MIN_RAM_BUDGET = 256 << 20
MAX_GPU_MEMORY = 1 << 40
CARD_SLACK = 1.1  # a budget up to 10% above a card's memory means the whole card
MAX_HOST_MEMORY = 1 << 46  # 64 TiB: only nonsense is refused (a plan may be for another host)


# ---- method options -----------------------------------------------------------------------
def _option(default, flag: str, kind: type, methods: tuple[str, ...], rule: str = "",
            check: Callable[[Any], bool] | None = None):
    """A method option: its default, how the user spells it, its type, the methods that take
    it and what `check` demands (for the refusal)."""
    return field(default=default, metadata={"flag": flag, "kind": kind, "methods": methods,
                                            "rule": rule, "check": check})


_GPTQ = ("gptq", "awq-gptq")  # awq-gptq: AWQ's scales, then GPTQ (methods/awq_gptq.py)
_AWQ = ("awq",)
_AWQ_SCALES = ("awq", "awq-gptq")
_ALL = METHODS
# how each group's scale and zero are chosen (methods/grid.py); how calibration tokens weigh
# (methods/token_weights.py)
SCALE_SEARCHES = ("minmax", "mse", "imatrix")
TOKEN_WEIGHTS = ("none", "outliers", "residual", "residual-in")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's options. act_order / static_groups None: act-order with static groups unless the
    user chose either (then the other is off; `resolved()`). With the symmetric default that
    is llm-compressor's default GPTQ scheme; SmolLM2: ppl 35.12 against 36.89 for asymmetric
    without act-order (issue 20), and adaptive allocations no worse than uniform GPTQ
    (results/quality_gpu_s6*.md); static groups need no g_idx: serving engines' fast path."""

    damp: float = _option(0.01, "--damp", float, _GPTQ, "in (0, 1)", lambda v: 0 < v < 1)
    act_order: bool | None = _option(None, "--act-order", bool, _GPTQ)
    static_groups: bool | None = _option(None, "--static-groups", bool, _GPTQ)
    block: int = _option(128, "block", int, _GPTQ, "a positive integer", lambda v: v >= 1)
    error_weights: str = _option("none", "--error-weights", str, ("gptq",), "none or residual",
                                 lambda v: v in ERROR_WEIGHTS)
    report_error: bool = _option(True, "report_error", bool, _GPTQ)

    def resolved(self) -> GPTQOptions:
        """act-order with static groups unless the user chose either (GPTQ's default)."""
        if self.act_order is None and self.static_groups is None:
            return replace(self, act_order=True, static_groups=True)
        return replace(self, act_order=bool(self.act_order),
                       static_groups=bool(self.static_groups))

    def plain(self) -> GPTQOptions:
        """Neither act-order nor static groups unless the user chose them (awq-gptq)."""
        return replace(self, act_order=bool(self.act_order),
                       static_groups=bool(self.static_groups))


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's options (methods/awq.py says what each does)."""

    grid: int = _option(20, "--awq-grid", int, _AWQ_SCALES, "a positive integer", lambda v: v >= 1)
    clip: bool = _option(True, "--awq-no-clip", bool, _AWQ)
    duo_scaling: bool = _option(True, "--awq-no-duo-scaling", bool, _AWQ_SCALES)
    clip_grid: int = _option(20, "clip_grid", int, _AWQ, "a positive integer", lambda v: v >= 1)
    max_shrink: float = _option(0.5, "max_shrink", float, _AWQ, "in [0, 1)",
                                lambda v: 0 <= v < 1)
    clip_tokens: int = _option(512, "clip_tokens", int, _AWQ, "a positive integer",
                               lambda v: v >= 1)
    rtn_baseline: bool = _option(True, "rtn_baseline", bool, _AWQ_SCALES)
    keep_identity: bool = _option(False, "keep_identity", bool, _AWQ_SCALES)
    cache_device: str = _option("auto", "cache_device", str, _AWQ_SCALES, "auto, device or cpu",
                                lambda v: v in ("auto", "device", "cpu"))
    # the activation statistic of the scale search weighted by the token weights as well
    weighted_stat: bool = _option(True, "weighted_stat", bool, _AWQ_SCALES)


@dataclass(frozen=True)
class RoundingOptions:
    """Options of every method (issue 20): how each group's scale and zero are chosen
    (methods/grid.py: minmax, mse, imatrix) and how calibration tokens weigh
    (methods/token_weights.py). None: not chosen; scale_search then is `imatrix` for uniform
    GPTQ (`validated()`), min-max otherwise, and tokens weigh alike."""

    scale_search: str | None = _option(None, "--scale-search", str, _ALL,
                                       "minmax, mse or imatrix", lambda v: v in SCALE_SEARCHES)
    token_weights: str | None = _option(None, "--token-weights", str, _ALL,
                                        "none, outliers, residual or residual-in",
                                        lambda v: v in TOKEN_WEIGHTS)

    @property
    def search(self) -> str:
        return self.scale_search or "minmax"

    @property
    def weights(self) -> str:
        return self.token_weights or "none"


OPTION_CLASSES = {"gptq": GPTQOptions, "awq": AWQOptions, "rounding": RoundingOptions}
# every method option by its keyword name (API keywords, get_method overrides)
OPTION_FIELDS = {f.name: (key, f) for key, cls in OPTION_CLASSES.items() for f in fields(cls)}


def _typed(flag: str, kind: type, value):
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{flag} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise InputError(f"{flag} must be {'an integer' if kind is int else 'a number'}"
                             f", got {value!r}")
        value = kind(value)
        if value != value:  # NaN
            raise InputError(f"{flag} must be a number, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise InputError(f"{flag} must be a {kind.__name__}, got {value!r}")
    return value


def checked_options(options, method: str):
    """`options` with every value typed and in range; refuses an option set (not at its
    default) that `method` does not take, naming the option as the user spelled it."""
    defaults = type(options)()
    values = {}
    for f in fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value == getattr(defaults, f.name):
            continue
        if method not in meta["methods"]:
            raise InputError(f"{meta['flag']} applies to --method {' / '.join(meta['methods'])} "
                             f"only, not --method {method}")
        value = _typed(meta["flag"], meta["kind"], value)
        if meta["check"] is not None and not meta["check"](value):
            raise InputError(f"{meta['flag']} must be {meta['rule']}, got {value!r}")
        values[f.name] = value
    return replace(options, **values)


def options_with(cls, options, overrides: dict, method: str):
    """`options` (default: cls()) with keyword `overrides`, checked for `method`: what a
    method's constructor takes (GPTQ(damp=0.05), get_method("awq", grid=10))."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InputError(f"unknown {method.upper()} option(s) {unknown}; known: "
                         f"{', '.join(sorted(names))}")
    return checked_options(replace(options or cls(), **overrides), method)


def rounding_with(rounding, overrides: dict, method: str) -> RoundingOptions:
    """`rounding` (default RoundingOptions()) with the rounding keywords taken out of
    `overrides` (scale_search="mse"), checked for `method`."""
    names = [f.name for f in fields(RoundingOptions)]
    given = {k: overrides.pop(k) for k in names if k in overrides}
    return options_with(RoundingOptions, rounding, given, method)


# ---- budgets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budgets:
    """--vram-budget and --ram-budget, parsed once for every device: bytes per GPU index
    (key None: the same for every GPU), and host bytes. Empty / None: not given (the plan
    then takes free memory less a margin, plan/machine.py). The text is kept for messages."""

    vram: tuple[tuple[int | None, int], ...] = ()
    ram: int | None = None
    vram_text: str | None = None
    ram_text: str | None = None

    @classmethod
    def parse(cls, vram: str | None = None, ram: str | None = None) -> Budgets:
        return cls(_parse_vram(vram), _parse_ram(ram), vram, ram)

    @property
    def per_gpu(self) -> dict[int | None, int]:
        return dict(self.vram)

    def named_gpus(self) -> list[int]:
        """The GPU indices a per-device budget names ([] for one size for every GPU)."""
        return sorted(i for i, _ in self.vram if i is not None)

    def vram_for(self, index: int) -> int:
        """The budget of cuda:`index`: a per-device list must name it."""
        per = self.per_gpu
        if None in per:
            return per[None]
        if index not in per:
            raise InputError(f"no budget for device(s) [{index}] in {self.vram_text!r}")
        return per[index]

    def check_gpus(self, used: list[int] | None) -> None:
        """A per-device list names exactly the GPUs in use (when they are known)."""
        named = self.named_gpus()
        if not named or used is None:
            return
        missing = sorted(set(used) - set(named))
        extra = sorted(set(named) - set(used))
        if missing:
            raise InputError(f"no budget for device(s) {missing} in {self.vram_text!r}")
        if extra:
            raise InputError(f"budget for device(s) {extra} that are not in use {list(used)}")

    def check_totals(self, gpus: dict[int, int]) -> None:
        """At most what each GPU has (`gpus`: {index: total bytes} of the visible ones; none
        visible: at most 1 TiB) and only visible GPUs named."""
        flag, text = "--vram-budget", self.vram_text
        for index, size in self.vram:
            if gpus and index is not None and index not in gpus:
                raise InputError(f"{flag} {text}: there is no cuda:{index} (visible: "
                                 f"{', '.join(f'cuda:{i}' for i in sorted(gpus))})")
            if not gpus and size > MAX_GPU_MEMORY:
                raise InputError(f"{flag} {text} is more than any GPU's memory (none has 1 TiB)")
            for i in ([index] if index is not None and gpus else sorted(gpus)):
                # A little above the card is the whole card ("80G" on an H100 80GB: 79.6
                # GiB; the plan caps it, plan/machine.cap_to_cards); far above is a mistake.
                if size > gpus[i] * CARD_SLACK:
                    raise InputError(f"{flag} {text} is more than the GPU's memory (cuda:{i} "
                                     f"has {format_size(gpus[i])})")


def _parse_vram(text) -> tuple[tuple[int | None, int], ...]:
    """--vram-budget: a size ("40G") or DEVICE:SIZE list, each at least 1 GiB."""
    if text is None:
        return ()
    flag = "--vram-budget"
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{flag} must be a size such as 40G or 0:20G,1:40G, got {text!r}")
    try:
        sizes = parse_budgets(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    for size in sizes.values():
        _check_range(flag, text, size, MIN_BUDGET, "(a CUDA context alone takes ~0.9 GiB)")
    return tuple(sorted(sizes.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _parse_ram(text) -> int | None:
    """--ram-budget: a size of at least 256 MiB (and not beyond any machine: 64 TiB). More than
    this machine has is allowed: a plan may be for another machine, and a budget above what
    is here simply does not bind."""
    if text is None:
        return None
    flag = "--ram-budget"
    try:
        size = parse_size(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    _check_range(flag, text, size, MIN_RAM_BUDGET, "(a process with torch alone takes more)")
    if size > MAX_HOST_MEMORY:
        raise InputError(f"{flag} {text} is not a memory size any machine has")
    return size


def _check_range(flag: str, text, size: int, minimum: int, why: str) -> None:
    if size < minimum:
        raise InputError(f"{flag} {text} is less than {format_size(minimum)} {why}")


# ---- the settings of a run ----------------------------------------------------------------
@dataclass(frozen=True)
class CalibSettings:
    source: str = "builtin"  # "builtin", a local .txt/.jsonl path, or pileval / wikitext2 / c4
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # Statistics are summed per shard of the samples, shards in order: the same sums on any
    # number of processes (parallel/shards.py); at most this many processes share a run.
    shards: int = 8


@dataclass(frozen=True)
class QuantSettings:
    bits: float = 4  # fractional targets (3.5) mean adaptive bit allocation
    group_size: int | str = "auto"  # int, -1 (per channel) or "auto"
    method: str | None = None  # None: default_method(bits, adaptive)
    # None: the export format's serving default (export/serving.py default_symmetric:
    # asymmetric for the AutoAWQ layout, symmetric for GPTQ and compressed-tensors)
    symmetric: bool | None = None
    calib: CalibSettings = field(default_factory=CalibSettings)
    dtype: str = "auto"  # working dtype: auto = fp16/bf16 on GPU (model's), float32 on CPU
    device: str = "auto"
    # one process per device (torch.distributed): ("cuda:0", "cuda:1") or ("cpu", "cpu")
    devices: tuple[str, ...] | None = None
    export_format: str = "auto"  # auto: awq for uniform 4-bit awq/rtn, gptq for gptq
    out_dtype: str = "float16"  # dtype of non-quantized tensors and scales in the export
    chunk_size: int = 8  # calibration samples per forward (runs without a memory plan)
    hidden_device: str = "auto"  # where layer inputs/outputs live between layers
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    rounding: RoundingOptions = field(default_factory=RoundingOptions)
    # Resume: hidden states entering each layer are saved when they are small enough,
    # otherwise a resumed run replays the finished layers from their files.
    save_hidden: str = "auto"  # auto | always | never
    save_hidden_max_bytes: int = 1 << 30
    budgets: Budgets = field(default_factory=Budgets)
    hessian_device: str = "auto"
    measurement: str | None = None  # reuse this measurement.json (adaptive GPTQ)
    adaptive: bool = False  # measure + allocate bits even for an integer --bits target
    tp_size: int | None = None  # refuse before any work unless the export loads at TP N
    pad_for_tp: int | None = None  # zero-pad the MLP width so the export loads at TP N
    # MoE: an expert routed fewer calibration tokens than this is rounded to nearest (RTN)
    # instead of calibrated, with a warning; the report lists tokens per expert.
    min_expert_tokens: int = 16
    # The engine the export is meant for: "vllm" checks its load-time rules before any work
    # and before publishing (errors refuse) and constrains adaptive bits to what it serves;
    # "none" skips both (a result setting: it changes adaptive allocations).
    engine: str = "vllm"

    # Settings that never change what a run produces: where and how fast work runs, and
    # tp_size, a check that either refuses before any work or lets the same output through
    # (so resuming with or without it continues the same job). pad_for_tp changes the
    # exported shapes and is part of the fingerprint.
    PLACEMENT_KEYS = ("device", "devices", "chunk_size", "hidden_device", "save_hidden",
                      "save_hidden_max_bytes", "vram_budget", "ram_budget", "hessian_device",
                      "measurement",  # a reused measurement is checked by its fingerprint
                      "tp_size")

    def replaced(self, **keywords) -> QuantSettings:
        """These settings with the API's keywords replacing fields: any setting by name, the
        calibration's as calib_data / calib_samples / calib_seqlen / seed / calib_shards, the
        budgets as vram_budget / ram_budget (strings), devices as "0,1", and method options
        by name (damp=0.05, grid=10). Anything else is refused."""
        calib = {_CALIB_KEYWORDS[k]: keywords.pop(k) for k in list(keywords)
                 if k in _CALIB_KEYWORDS}
        changed: dict[str, Any] = {"calib": replace(self.calib, **calib)} if calib else {}
        if "vram_budget" in keywords or "ram_budget" in keywords:
            changed["budgets"] = Budgets.parse(
                keywords.pop("vram_budget", self.budgets.vram_text),
                keywords.pop("ram_budget", self.budgets.ram_text))
        if "devices" in keywords:
            devices = keywords.pop("devices")
            if isinstance(devices, (list, tuple)):
                devices = ",".join(map(str, devices))
            changed["devices"] = parse_devices(devices)
        own = {f.name for f in fields(self)} - {"calib", "budgets", "gptq", "awq", "rounding",
                                          "devices"}
        changed.update({k: keywords.pop(k) for k in list(keywords) if k in own})
        options: dict[str, dict] = {}
        for name, value in keywords.items():
            if name not in OPTION_FIELDS:
                method = changed.get("method", self.method)
                known = ", ".join(sorted(n for n, (_, f) in OPTION_FIELDS.items()
                                         if method in f.metadata["methods"]))
                raise InputError(f"unknown option {name!r} for --method {method}"
                                 + (f" (it takes: {known})" if known else " (it takes none)"))
            options.setdefault(OPTION_FIELDS[name][0], {})[name] = value
        for key, values in options.items():
            changed[key] = replace(getattr(self, key), **values)
        return replace(self, **changed)

    # ---- validation ---------------------------------------------------------------------
    def validated(self) -> QuantSettings:
        """These settings checked and normalised (bits an int when whole, the group size an
        int or "auto", the method and its options resolved), or InputError with one line
        naming the option: before anything is written, on any machine."""
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        adaptive = self.adaptive or bool(self.measurement)
        bits = check_bits(self.bits, adaptive)
        method = self.method or default_method(bits, adaptive)
        gptq = checked_options(self.gptq, method)
        awq = checked_options(self.awq, method)
        rounding = checked_options(self.rounding, method)
        if method == "gptq":
            gptq = gptq.resolved()
        if method == "gptq" and not self.is_adaptive and rounding.scale_search is None:
            # group scales and zeros from the imatrix-weighted shrink grid (methods/grid.py):
            # SmolLM2, CPU, 8 x 512 WikiText calibration: ppl 34.11 / KL 0.173 against 40.65 /
            # 0.304 with min-max (benchmarks/results/quality_cpu_smollm2.md). Adaptive GPTQ
            # keeps min-max (its measurements were not re-made with the grid).
            rounding = replace(rounding, scale_search="imatrix")
        self._check_scalars()
        self._check_run_settings()
        return replace(self, bits=bits, method=method, group_size=_group_size(self.group_size),
                       gptq=gptq, awq=awq, rounding=rounding)

    def _check_scalars(self) -> None:
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise InputError(f"--sym / --asym must be true or false, got {self.symmetric!r}")
        check_choice("--engine", self.engine, ENGINES)
        for flag, value in (("--tp-size", self.tp_size), ("--pad-for-tp", self.pad_for_tp)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InputError(f"{flag} must be a positive integer, got {value!r}")
        if not isinstance(self.budgets, Budgets):
            raise InputError(f"budgets must be Budgets.parse(vram, ram), got {self.budgets!r}")

    def _check_run_settings(self) -> None:
        """Calibration, devices, dtypes, placement."""
        c = self.calib
        if not isinstance(c.source, str) or not c.source:
            raise InputError(f"--calib-data must be builtin, a file or a dataset name, "
                             f"got {c.source!r}")
        check_int("--calib-samples", c.samples, 0)
        check_int("--calib-seqlen", c.seqlen, 1)
        check_int("--seed", c.seed, 0)
        check_int("--calib-shards", c.shards, 1)
        check_int("--min-expert-tokens", self.min_expert_tokens, 0)
        check_int("chunk_size", self.chunk_size, 1)
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--format", self.export_format, EXPORT_FORMATS)
        check_choice("out_dtype", self.out_dtype, OUT_DTYPES)
        check_choice("--save-hidden", self.save_hidden, SAVE_HIDDEN)
        check_choice("--hessian-device", self.hessian_device, HESSIAN_DEVICES)
        check_choice("--hidden-device", self.hidden_device, HIDDEN_DEVICES)
        check_device_name(self.device)
        if self.measurement is not None and not Path(self.measurement).is_file():
            raise InputError(f"--measurement {self.measurement}: no such file (make one with "
                             f"quantize measure MODEL -o FILE)")

    # ---- what the run reads -------------------------------------------------------------
    @property
    def is_adaptive(self) -> bool:
        return bool(self.adaptive or self.measurement or not float(self.bits).is_integer())

    @property
    def options(self) -> GPTQOptions | AWQOptions | None:
        """The method's own options (None for RTN; awq-gptq takes AWQ's and GPTQ's:
        `option_sets`)."""
        options: dict[str, GPTQOptions | AWQOptions] = {"gptq": self.gptq, "awq": self.awq}
        return options.get(self.method or "")

    def option_sets(self) -> tuple:
        """Every options object the method reads: its own (awq-gptq: AWQ's, then GPTQ's) and
        the rounding options every method takes."""
        own = {"awq": (self.awq,), "gptq": (self.gptq,),
               "awq-gptq": (self.awq, self.gptq)}.get(self.method or "", ())
        return own + (self.rounding,)

    def options_record(self) -> dict:
        """The method's options that differ from their defaults (GPTQ: act-order and static
        groups always), as the job fingerprint and layerquant.json record them."""
        out = {}
        for opts in self.option_sets():
            defaults = type(opts)()
            out.update({f.name: getattr(opts, f.name) for f in fields(opts)
                        if getattr(opts, f.name) != getattr(defaults, f.name)})
        if self.method == "gptq":
            out.update(act_order=self.gptq.act_order, static_groups=self.gptq.static_groups)
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("gptq", "awq", "rounding", "budgets")}
        d["calib"] = asdict(self.calib)
        d["method_options"] = self.options_record()
        d["vram_budget"], d["ram_budget"] = self.budgets.vram_text, self.budgets.ram_text
        d["devices"] = list(self.devices) if self.devices else None
        return d

    def result_dict(self) -> dict:
        """Every setting that changes the output (placement and chunking do not)."""
        d = self.to_dict()
        for k in self.PLACEMENT_KEYS:
            d.pop(k, None)
        return d


_CALIB_KEYWORDS = {"calib_data": "source", "calib_samples": "samples",
                   "calib_seqlen": "seqlen", "seed": "seed", "calib_shards": "shards"}
# the API's keyword names of QuantSettings (quantize(**keywords))
SETTING_KEYWORDS = tuple(sorted(
    set(_CALIB_KEYWORDS) | {"vram_budget", "ram_budget"}
    | {f.name for f in fields(QuantSettings)} - {"calib", "budgets", "gptq", "awq", "rounding"}))


@dataclass(frozen=True)
class OutputSettings:
    """Where a run writes and what it may replace: the export directory, the job directory
    (default OUTPUT.job), --overwrite / --resume, and the export's shard size."""

    output: Path
    work_dir: Path | None = None
    overwrite: bool = False
    resume: bool = False
    max_shard_bytes: int = 1 << 30

    def validated(self) -> OutputSettings:
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other: pass --resume "
                             "to continue the job or --overwrite to start over, not both")
        check_positive_size("--max-shard-size", self.max_shard_bytes)
        output = Path(self.output).absolute()
        work = (Path(self.work_dir).absolute() if self.work_dir
                else output.parent / (output.name + ".job"))
        return replace(self, output=output, work_dir=work)

    @property
    def work(self) -> Path:
        """The job directory, once validated() has chosen it."""
        if self.work_dir is None:
            raise ValueError("internal: OutputSettings.work before validated()")
        return self.work_dir


# ---- rules shared by the settings and the command lines -----------------------------------
def default_method(bits: float = 4, adaptive: bool = False) -> str:
    """The method a run uses when none is named (CLI, API and `quantize plan` alike): AWQ for
    4-bit, GPTQ otherwise; adaptive GPTQ for fractional targets."""
    try:
        fractional = not float(bits).is_integer()
    except (TypeError, ValueError, OverflowError):
        fractional = False  # --bits itself is refused by validated(), naming the option
    if adaptive or fractional:
        return "gptq"
    return "awq" if float(bits) == 4 else "gptq"


def check_choice(flag: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def check_int(flag: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{flag} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")
    return value


def check_positive_size(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag} must be a positive size such as 1G or 500M, got {value!r}")


def check_bits(value, adaptive: bool):
    """A finite number of bits per weight in [2, 8]; an int when it is one. Adaptive targets
    must be above 2: every measured candidate stores at least 2-bit codes plus scales."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
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


def _group_size(value) -> int | str:
    if isinstance(value, str) and value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"--group-size must be an integer, -1 or auto, "
                             f"got {value!r}") from None
    if isinstance(value, bool) or not (value == "auto" or isinstance(value, int)):
        raise InputError(f"--group-size must be an integer, -1 or auto, got {value!r}")
    if isinstance(value, int) and value != -1 and value < 1:
        raise InputError(f"--group-size must be positive, -1 or auto, got {value}")
    return value


def check_device_name(text, flag: str = "--device") -> None:
    """auto, cpu, cuda or cuda:N (whether that GPU is there: run.job.check_placement)."""
    kind, sep, index = str(text).partition(":")
    if isinstance(text, str) and (text == "auto" or kind in ("cpu", "cuda") and (
            not sep or index.isdigit())):
        return
    raise InputError(f"{flag} must be auto, cpu, cuda or cuda:N, got {text!r}")


def parse_devices(text: str | None) -> tuple[str, ...] | None:
    """`--devices`: "0,1" (CUDA indices), "all" (every visible GPU: resolved when the run
    starts, parallel/distributed.py) or "cpu,cpu" (one CPU process per entry). None when not
    given."""
    if text is None or str(text).strip() == "":
        return None
    if str(text).strip() == "all":
        return ("all",)
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "cpu":
            out.append("cpu")
        elif part.isdigit():
            out.append(f"cuda:{part}")
        elif part.startswith("cuda:") and part[5:].isdigit():
            out.append(part)
        else:
            raise InputError(f"--devices: {part!r} is not a GPU index, cuda:N or cpu")
    gpus = [d for d in out if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise InputError(f"--devices {text}: a GPU is named twice (one process per GPU)")
    if gpus and "cpu" in out:
        raise InputError(f"--devices {text}: mix of cpu and GPUs (one backend per run)")
    return tuple(out)
