"""Every setting of a run in one place, and the fingerprint of those that change the result."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError

AUTO_GROUP_SIZES = (128, 64, 32)
METHODS = ("rtn", "awq", "gptq", "awq-gptq")


@dataclass
class CalibSettings:
    source: str = "builtin"  # "builtin", a local .txt/.jsonl path, or pileval / wikitext2 / c4
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # Statistics are summed per shard of the samples, shards in order: the same sums on any
    # number of processes (quantizer/shards.py); at most this many processes share a run.
    shards: int = 8


@dataclass
class QuantSettings:
    bits: float = 4  # fractional targets (3.5) mean adaptive bit allocation
    group_size: int | str = "auto"  # int, -1 (per channel) or "auto"
    method: str = "rtn"
    # None: the export format's serving default (export/serving.py default_symmetric:
    # asymmetric for the AutoAWQ layout, symmetric for GPTQ and compressed-tensors)
    symmetric: bool | None = None
    calib: CalibSettings = field(default_factory=CalibSettings)
    dtype: str = "auto"  # working dtype: auto = fp16/bf16 on GPU (model's), float32 on CPU
    device: str = "auto"
    export_format: str = "auto"  # auto: awq for uniform 4-bit awq/rtn, gptq for gptq
    out_dtype: str = "float16"  # dtype of non-quantized tensors and scales in the export
    chunk_size: int = 8  # calibration samples per forward
    hidden_device: str = "auto"  # where layer inputs/outputs live between layers
    method_options: dict = field(default_factory=dict)
    # Resume: hidden states entering each layer are saved when they are small enough,
    # otherwise a resumed run replays the finished layers from their files.
    save_hidden: str = "auto"  # auto | always | never
    save_hidden_max_bytes: int = 1 << 30
    vram_budget: str | None = None  # "40G" or "0:20G,1:40G"
    ram_budget: str | None = None
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
    PLACEMENT_KEYS = ("device", "chunk_size", "hidden_device", "save_hidden",
                      "save_hidden_max_bytes", "vram_budget", "ram_budget", "hessian_device",
                      "measurement",  # a reused measurement is checked by its fingerprint
                      "tp_size")

    def validate(self) -> None:
        """Refuse bad settings with one line naming the option, before anything is written
        and whatever the device (a budget is checked on a machine without a GPU too)."""
        from . import options as o
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.bits = o.check_bits(self.bits, self.adaptive or bool(self.measurement))
        if isinstance(self.group_size, str) and self.group_size != "auto":
            try:
                self.group_size = int(self.group_size)
            except ValueError:
                raise InputError(f"--group-size must be an integer, -1 or auto, "
                                 f"got {self.group_size!r}") from None
        if isinstance(self.group_size, bool) or not (
                self.group_size == "auto" or isinstance(self.group_size, int)):
            raise InputError(f"--group-size must be an integer, -1 or auto, got {self.group_size!r}")
        if isinstance(self.group_size, int) and self.group_size != -1 and (
                self.group_size < 1):
            raise InputError(f"--group-size must be positive, -1 or auto, got {self.group_size}")
        self._validate_run_settings(o)
        if self.method == "gptq" and not (
                {"act_order", "static_groups"} & set(self.method_options)):
            # GPTQ quantizes in activation order with static groups unless told otherwise
            # (with the symmetric default: llm-compressor's default GPTQ scheme). SmolLM2:
            # ppl 35.12 against 36.89 for asymmetric without act-order (issue 20), and the
            # adaptive allocation no worse than uniform GPTQ (results/quality_gpu_s6*.md);
            # static groups need no g_idx: serving engines' fast path.
            self.method_options = {**self.method_options, "act_order": True,
                                   "static_groups": True}
        if (self.method == "gptq" and not self.is_adaptive
                and "scale_search" not in self.method_options):
            # group scales and zeros from the imatrix-weighted shrink grid (methods/grid.py):
            # SmolLM2, CPU, 8 x 512 WikiText calibration: ppl 34.11 / KL 0.173 against 40.65 /
            # 0.304 with min-max (benchmarks/results/quality_cpu_smollm2.md). Adaptive GPTQ
            # keeps min-max (its measurements were not re-made with the grid).
            self.method_options = {**self.method_options, "scale_search": "imatrix"}
        self.method_options = o.check_method_options(self.method, self.method_options)
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise InputError(f"--sym / --asym must be true or false, got {self.symmetric!r}")
        if self.engine not in ("vllm", "none"):
            raise InputError(f"--engine must be vllm or none, got {self.engine!r}")
        for flag, value in (("--tp-size", self.tp_size), ("--pad-for-tp", self.pad_for_tp)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InputError(f"{flag} must be a positive integer, got {value!r}")

    def _validate_run_settings(self, o) -> None:
        """Calibration, devices, dtypes, budgets, placement: options.py's rules."""
        c = self.calib
        if not isinstance(c.source, str) or not c.source:
            raise InputError(f"--calib-data must be builtin, a file or a dataset name, "
                             f"got {c.source!r}")
        o.check_int("--calib-samples", c.samples, 0)
        o.check_int("--calib-seqlen", c.seqlen, 1)
        o.check_int("--seed", c.seed, 0)
        o.check_int("--calib-shards", c.shards, 1)
        o.check_int("--min-expert-tokens", self.min_expert_tokens, 0)
        o.check_int("chunk_size", self.chunk_size, 1)
        o.check_choice("--dtype", self.dtype, o.DTYPES)
        o.check_choice("--format", self.export_format, o.EXPORT_FORMATS)
        o.check_choice("out_dtype", self.out_dtype, o.OUT_DTYPES)
        o.check_choice("--save-hidden", self.save_hidden, o.SAVE_HIDDEN)
        o.check_choice("--hessian-device", self.hessian_device, o.HESSIAN_DEVICES)
        if not str(self.hidden_device).startswith("cuda"):  # the plan's choice: cuda:N
            o.check_choice("--hidden-device", self.hidden_device, o.HIDDEN_DEVICES)
        o.check_device(self.device)
        o.check_vram_budget(self.vram_budget, o.visible_gpu_memory())
        o.check_ram_budget(self.ram_budget)
        if self.measurement is not None and not Path(self.measurement).is_file():
            raise InputError(f"--measurement {self.measurement}: no such file (make one with "
                             f"quantize measure MODEL -o FILE)")

    @property
    def is_adaptive(self) -> bool:
        return bool(self.adaptive or self.measurement or not float(self.bits).is_integer())

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def working_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device().type == "cpu":
            return torch.float32  # CPU half matmuls are slow and sometimes missing
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def to_dict(self) -> dict:
        return asdict(self)

    def result_dict(self) -> dict:
        """Every setting that changes the output (placement and chunking do not)."""
        d = self.to_dict()
        for k in self.PLACEMENT_KEYS:
            d.pop(k, None)
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.result_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_method(bits: float = 4, adaptive: bool = False) -> str:
    """The method a run uses when none is named (CLI and API alike): AWQ for 4-bit (the
    common case, when available), GPTQ otherwise; adaptive GPTQ for fractional targets."""
    try:
        fractional = not float(bits).is_integer()
    except (TypeError, ValueError, OverflowError):
        fractional = False  # --bits itself is refused by validate(), naming the option
    if adaptive or fractional:
        return "gptq"
    from .methods import available
    return "awq" if "awq" in available() and float(bits) == 4 else "gptq"


def resolve_group_size(requested: int | str, widths: dict[str, int]) -> tuple[int, str]:
    """Pick the group size for all quantized linears. `widths` maps module names to in_features.

    auto: the largest of 128/64/32 that divides every width, else per channel (-1). The
    pipeline passes the widths that cannot be padded (the MLP intermediate can: it is then
    zero-padded to a multiple of the chosen size)."""
    if requested == "auto":
        for g in AUTO_GROUP_SIZES:
            if all(w % g == 0 for w in widths.values()):
                return g, f"group size auto -> {g} (divides every fixed quantized input width)"
        bad = sorted({w for w in widths.values() if w % 32})
        return -1, (f"group size auto -> per-channel (-1): input widths {bad} are not "
                    f"multiples of 32")
    g = int(requested)
    if g != -1:
        for name, w in widths.items():
            if w % g:
                raise InputError(f"group size {g} does not divide in_features={w} of {name}; "
                                 f"use --group-size auto or a divisor of {w}")
    return g, f"group size {g}"
