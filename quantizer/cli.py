"""`quantize` command line. Exit codes: 0 ok, 2 bad input (one line on stderr, nothing
written), 3 out of memory, 130 Ctrl-C, 143 SIGTERM (both: finished layers kept for --resume),
1 other. Paths are checked before torch is imported, so a typo answers at once."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import InputError, OutOfMemory, QuantizerError, Terminated
from .outputs import local_model_path

SUBCOMMANDS = ("eval", "plan", "demo", "check", "measure")


def _size(text: str) -> int:
    from .memsize import parse_size
    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Parser(argparse.ArgumentParser):
    """No prefix matching (`--bit 4` is not `--bits 4`: a later flag could change its
    meaning), and a usage error is one line on stderr and exit 2, like every bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _bits(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be a number, got {text!r}") from None


def quantize_parser() -> argparse.ArgumentParser:
    p = Parser(prog="quantize", description=(
        "Quantize a model layer by layer. Subcommands: quantize eval OUT | quantize plan "
        "MODEL | quantize check OUT [--tp-size N] | quantize demo"))
    p.add_argument("model", help="model directory (config.json + safetensors) or hub id")
    p.add_argument("-o", "--output", required=True, help="output directory (new, empty, or "
                   "an export of ours with --overwrite)")
    p.add_argument("--bits", type=_bits, default=4.0, help="bits per weight, 2-8 (default 4); "
                   "a fractional target such as 4.25 (or --adaptive) allocates bits per module "
                   "group with adaptive GPTQ")
    p.add_argument("--group-size", default="auto", help="128, 64, 32, -1 (per channel) or auto")
    p.add_argument("--method", default=None, help="rtn, awq, gptq or awq-gptq (AWQ's "
                   "scales, then GPTQ rounding); default: awq when available, else rtn")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, default=None,
                     help="symmetric quantization (default for GPTQ and compressed-tensors)")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="asymmetric (zero points; default for the AWQ layout). vLLM serves "
                     "asymmetric compressed-tensors at 4/8 bit on dense layers only")
    p.add_argument("--engine", choices=("vllm", "none"), default="vllm", help="the engine the "
                   "export is for: vllm (default) checks its load-time rules before any work "
                   "and before publishing, and keeps adaptive bits to what it serves; none "
                   "skips that")
    p.add_argument("--format", dest="export_format", default="auto",
                   help="awq, gptq or compressed-tensors (default: by method and bits)")
    p.add_argument("--calib-data", default="builtin",
                   help="builtin, a .txt/.jsonl file, or pileval / wikitext2 / c4")
    p.add_argument("--calib-samples", type=_nonnegative, default=128, help="calibration "
                   "sequences drawn from --calib-data (default 128; 0 with --method rtn: none)")
    p.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per "
                   "calibration sequence (default 512; at most the model's context)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the calibration "
                   "draw: same seed, same samples, same export (default 0)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when visible, else the "
                   "CPU), cpu, cuda or cuda:N")
    p.add_argument("--devices", default=None, help="one process per device through "
                   "torch.distributed: GPU indices (0,1), all, or cpu,cpu; under torchrun "
                   "each process joins (default there: cuda:LOCAL_RANK)")
    p.add_argument("--calib-shards", type=_positive, default=8, help="calibration shards: "
                   "statistics are summed per shard in shard order, so any number of "
                   "processes up to this gives the same output (default 8)")
    p.add_argument("--dtype", default="auto", help="working dtype: auto, float16, bfloat16, "
                   "float32")
    p.add_argument("--damp", type=float, default=None, help="GPTQ dampening (fraction of "
                   "mean diagonal)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order: columns in order of decreasing Hessian diagonal "
                   "(default: on, with static groups; --no-act-order to opt out)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order with groups fixed before reordering: no g_idx, the "
                   "fast serving path")
    p.add_argument("--error-weights", choices=("none", "residual"), default=None,
                   help="adaptive GPTQ: count every group's measured block error alike "
                   "(default), or weigh it by its block's share of the residual stream")
    p.add_argument("--measurement", default=None, help="reuse this measurement.json: skip "
                   "measuring and allocate bits for --bits (adaptive GPTQ)")
    p.add_argument("--adaptive", action="store_true", help="measure and allocate bits per "
                   "module group even for an integer --bits target (implied by 3.5 etc.)")
    p.add_argument("--vram-budget", default=None, help="GPU memory to stay under, per GPU "
                   "(e.g. 40G, 12GiB, 0:20G,1:40G); default: free memory minus a margin")
    p.add_argument("--ram-budget", default=None, help="host memory budget (default: available)")
    p.add_argument("--hessian-device", default="auto", help="auto, gpu or cpu")
    p.add_argument("--hidden-device", default="auto", choices=("auto", "gpu", "cpu", "disk"),
                   help="where calibration hidden states wait between layers (auto: the plan)")
    p.add_argument("--tp-size", type=_positive, default=None, help="refuse before any work "
                   "unless the export loads under tensor parallelism N (vLLM / Marlin shapes)")
    p.add_argument("--pad-for-tp", type=_positive, default=None, help="zero-pad the MLP "
                   "intermediate size so the export loads at TP N (exact; config.json updated)")
    p.add_argument("--min-expert-tokens", type=_nonnegative, default=16, help="MoE: experts routed "
                   "fewer calibration tokens are rounded to nearest (RTN), with a warning")
    p.add_argument("--awq-grid", type=int, default=None, help="AWQ scale grid points (20)")
    p.add_argument("--awq-no-clip", action="store_true", help="skip AWQ's clipping search")
    p.add_argument("--awq-no-duo-scaling", action="store_true",
                   help="AWQ scales from activations only (no weight term)")
    p.add_argument("--scale-search", choices=("minmax", "mse", "imatrix"), default=None,
                   help="how each group's scale and zero are chosen: minmax; mse (a shrink "
                   "grid on the weight error); imatrix (the grid weighted by the inputs' "
                   "E[x^2]: RTN then calibrates)")
    p.add_argument("--token-weights", choices=("none", "outliers", "residual", "residual-in"),
                   default=None, help="how calibration tokens weigh: alike (none); outliers: "
                   "tokens whose residual stream is massive (attention sinks) by 1/mean(h^2) "
                   "against their sequence's median; residual / residual-in: every token by "
                   "1/mean(h^2) of the stream after / entering its block")
    p.add_argument("--max-shard-size", type=_size, default=_size("1G"), help="largest "
                   "safetensors shard of the export (default 1G)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export and "
                   "job directory that layerquant wrote (never other files)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job from "
                   "its last finished layer (deletes nothing)")
    p.add_argument("--work-dir", default=None, help="job directory (default: OUTPUT.job)")
    p.add_argument("--save-hidden", default="auto", choices=("auto", "always", "never"),
                   help="checkpoint hidden states per layer (auto: when they fit in 1 GiB; "
                   "otherwise a resume replays finished layers)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def eval_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_method(bits: float = 4, adaptive: bool = False) -> str:
    """AWQ for 4-bit (the common case); adaptive GPTQ for fractional targets (the API's
    default too: quantizer.config.default_method)."""
    from .config import default_method as chosen
    return chosen(bits, adaptive)


def gptq_options(a) -> dict:
    """The GPTQ options given on the command line (absent ones keep the method's defaults)."""
    options = {} if a.damp is None else {"damp": a.damp}
    for key in ("act_order", "static_groups", "scale_search", "token_weights"):
        if getattr(a, key, None) is not None:
            options[key] = getattr(a, key)
    return options


def run_quantize_cli(argv) -> int:
    a = quantize_parser().parse_args(argv)
    local_model_path(a.model)  # a missing path, said before torch is imported
    from . import distributed
    from .api import quantize
    joined = distributed.under_launcher() and not distributed.world().distributed
    if joined:
        distributed.join(distributed.parse_devices(a.devices))  # started by torchrun
    options = gptq_options(a)
    if a.error_weights is not None:
        options["error_weights"] = a.error_weights
    if a.awq_grid is not None:
        options["grid"] = a.awq_grid
    if a.awq_no_clip:
        options["clip"] = False
    if a.awq_no_duo_scaling:
        options["duo_scaling"] = False
    # Log lines go to stderr with --json too (stdout then holds only the report): a run
    # killed by a time limit still shows its plan and any out-of-memory retries.
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = quantize(a.model, a.output, bits=a.bits, group_size=a.group_size,
                      method=a.method or default_method(a.bits, a.adaptive or bool(a.measurement)),
                      symmetric=a.symmetric, engine=a.engine,
                      calib_data=a.calib_data, calib_samples=a.calib_samples,
                      calib_seqlen=a.calib_seqlen, seed=a.seed, device=a.device, dtype=a.dtype,
                      export_format=a.export_format, overwrite=a.overwrite,
                      resume=a.resume, work_dir=a.work_dir, save_hidden=a.save_hidden,
                      measurement=a.measurement, adaptive=a.adaptive,
                      vram_budget=a.vram_budget, ram_budget=a.ram_budget,
                      hessian_device=a.hessian_device, hidden_device=a.hidden_device,
                      tp_size=a.tp_size, pad_for_tp=a.pad_for_tp, devices=a.devices,
                      calib_shards=a.calib_shards, min_expert_tokens=a.min_expert_tokens,
                      progress=not (a.no_progress or a.json), max_shard_bytes=a.max_shard_size,
                      log=log, **options)
    if distributed.world().main:
        print(result.to_json() if a.json else result)
    if joined:
        distributed.leave()
    return 0


def run_measure_cli(argv) -> int:
    """`quantize measure MODEL -o measurement.json`: the quantize options that a measurement
    depends on (calibration, --sym, --damp, --act-order, --static-groups, placement)."""
    p = quantize_parser()
    p.prog = "quantize measure"
    p.description = ("Measure adaptive GPTQ's candidates into measurement.json; then "
                     "`quantize MODEL --bits T --measurement FILE` for any target T")
    for action in p._actions:
        if action.dest == "output":
            action.help = "the measurement file to write (e.g. measurement.json), not a directory"
    a = p.parse_args(argv)
    local_model_path(a.model)
    from .api import measure
    options = gptq_options(a)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    summary = measure(a.model, a.output, calib_data=a.calib_data, calib_samples=a.calib_samples,
                      calib_seqlen=a.calib_seqlen, seed=a.seed, symmetric=a.symmetric,
                      group_size=a.group_size, device=a.device, dtype=a.dtype,
                      overwrite=a.overwrite, resume=a.resume, work_dir=a.work_dir,
                      progress=not (a.no_progress or a.json), log=log,
                      vram_budget=a.vram_budget, ram_budget=a.ram_budget,
                      hessian_device=a.hessian_device, hidden_device=a.hidden_device,
                      calib_shards=a.calib_shards, **options)
    if a.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(f"measured {summary['layers_measured']} of {summary['layers']} layers into "
              f"{summary['measurement']} ({summary['seconds']:.1f} s); quantize with "
              f"--measurement {summary['measurement']} --bits TARGET")
    return 0


def run_eval_cli(argv) -> int:
    a = eval_parser().parse_args(argv)
    _existing(a.model, "model")
    if a.base is not None:
        _existing(a.base, "--base")
    from .evaluation import evaluate
    result = evaluate(a.model, base=a.base, data=a.data, seqlen=a.seqlen,
                      max_windows=a.max_windows, device=a.device,
                      progress=not (a.no_progress or a.json), devices=a.devices)
    print(result.to_json() if a.json else result)
    return 0


def run_demo_cli(argv) -> int:
    from .demo import main as demo_main
    return demo_main(argv)


def plan_parser() -> argparse.ArgumentParser:
    p = Parser(prog="quantize plan", description=(
        "Print the memory plan and the predicted peak per device, reading config.json only; "
        "refuse with the smallest budget that would work when nothing fits"))
    p.add_argument("model", help="model directory or config.json")
    p.add_argument("--bits", default="4", help="bits per weight, 2-8 (default 4)")
    p.add_argument("--method", default="awq", choices=("rtn", "awq", "gptq", "awq-gptq"),
                   help="rtn, awq, gptq or awq-gptq (default awq)")
    p.add_argument("--vram-budget", default=None, help="per GPU, e.g. 40G, or 0:20G,1:40G")
    p.add_argument("--ram-budget", default=None, help="host memory, e.g. 64G")
    p.add_argument("--devices", default=None, help="GPU indices, e.g. 0,1 (default: visible)")
    p.add_argument("--calib-samples", type=_nonnegative, default=128,
                   help="calibration sequences (default 128)")
    p.add_argument("--calib-seqlen", type=_positive, default=512,
                   help="tokens per calibration sequence (default 512)")
    p.add_argument("--hidden-device", default="auto", choices=("auto", "gpu", "cpu", "disk"),
                   help="auto, gpu, cpu or disk")
    p.add_argument("--hessian-device", default="auto", choices=("auto", "gpu", "cpu"),
                   help="auto, gpu or cpu")
    p.add_argument("--group-size", type=int, default=128, help="the export's group size "
                   "(its size on disk and in host RAM; -1 per channel)")
    p.add_argument("--tp-size", type=_positive, nargs="+", default=None, metavar="N",
                   help="also say whether the export would load at tensor parallel N (and the "
                        "padded MLP width that makes it load), e.g. --tp-size 2 4")
    return p


def run_plan_cli(argv) -> int:
    a = plan_parser().parse_args(argv)
    _existing(a.model, "model")
    from .options import check_ram_budget, check_vram_budget, visible_gpu_memory
    gpus = visible_gpu_memory()
    check_vram_budget(a.vram_budget, gpus)
    check_ram_budget(a.ram_budget)
    from .plan import plan_command
    if a.vram_budget and not gpus:
        print(f"no GPU is visible here: planned for the GPU(s) --vram-budget "
              f"{a.vram_budget} names (cuda:0 when it names none), as on the machine that "
              f"will run it")
    print(plan_command(a.model, a.bits, a.method, a.vram_budget, a.ram_budget, a.devices,
                       a.calib_samples, a.calib_seqlen, a.hidden_device, a.hessian_device,
                       group_size=a.group_size))
    from .tp import check_checkpoint, describe_problems
    for n in a.tp_size or ():
        problems, sizes = check_checkpoint(a.model, n, a.group_size)
        print(f"\nTP-{n}: ok (group size {', '.join(map(str, sizes))})" if not problems else
              "\n" + describe_problems(problems, n, ", ".join(map(str, sizes))))
    return 0


def check_parser() -> argparse.ArgumentParser:
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


def run_check_cli(argv) -> int:
    a = check_parser().parse_args(argv)
    from pathlib import Path

    from .tp import (check_checkpoint, checkpoint_group_sizes, describe_problems,
                     problem_summary)
    path = Path(a.model)
    if path.is_dir() and any(path.glob("*.safetensors")) and _has_quantized(path):
        from .export.serving import check_export
        report = check_export(path, a.tp_size or 1, a.engine, strict_tp=a.tp_size is not None)
        print(json.dumps(report.to_dict(), indent=1) if a.json else report.render())
        if a.tp_size and not any(f.rule in ("marlin-shape", "moe-marlin-shape", "tp-split")
                                 for f in report.findings) and not a.json:
            sizes = checkpoint_group_sizes(json.loads((path / "config.json").read_text()),
                                           a.group_size)
            print(f"TP-{a.tp_size}: ok (group size {', '.join(map(str, sizes))})")
        if report.errors:  # the report above; one line on stderr, as every refusal
            raise InputError(f"{path}: {len(report.errors)} serving error(s) listed above: vLLM "
                             f"would refuse this export or load it wrong")
        return 0
    tp = a.tp_size or 1
    problems, sizes = check_checkpoint(a.model, tp, a.group_size)
    if not problems:
        print(f"TP-{tp}: ok (group size {', '.join(map(str, sizes))})")
        return 0
    groups = ", ".join(map(str, sizes))
    print(describe_problems(problems, tp, groups))  # the report: every problem
    raise InputError(problem_summary(problems, tp, groups) + " (listed above)")


def _existing(path: str, what: str) -> None:
    if not os.path.exists(os.path.expanduser(path)):
        raise InputError(f"{what} path does not exist: {path}")


def _has_quantized(path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("quantization_config"))


def _dump_stacks_every(seconds: str | None) -> None:
    """LAYERQUANT_DUMP_STACKS=60: every 60 s, every thread's Python stack to stderr. A run
    that is killed for time (a benchmark's limit) then shows where it spent it."""
    if not seconds:
        return
    import faulthandler
    try:
        every = float(seconds)
    except ValueError:
        raise InputError(f"LAYERQUANT_DUMP_STACKS must be seconds, got {seconds!r}") from None
    if every > 0:
        faulthandler.dump_traceback_later(every, repeat=True, file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {"eval": run_eval_cli, "plan": run_plan_cli, "demo": run_demo_cli,
                "check": run_check_cli, "measure": run_measure_cli}
    handler = run_quantize_cli
    if argv and argv[0] in handlers:
        handler = handlers[argv.pop(0)]
    resumable = handler in (run_quantize_cli, run_measure_cli)
    debug = bool(os.environ.get("LAYERQUANT_DEBUG"))
    from .warmup import configure_caches
    configure_caches()  # before anything imports triton
    previous = _stop_on_sigterm()
    try:
        _dump_stacks_every(os.environ.get("LAYERQUANT_DUMP_STACKS"))
        return handler(argv)
    except InputError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (OutOfMemory, MemoryError) as e:
        print(f"error: out of memory: {_one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = (": finished layers are saved; rerun the same command with --resume"
                if resumable else "")
        print(what + hint, file=sys.stderr)
        return Terminated.exit_code if isinstance(e, Terminated) else 130
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            print(f"error: out of GPU memory: {str(e).splitlines()[0]}", file=sys.stderr)
            return 3
        if debug:
            raise
        code = e.exit_code if isinstance(e, QuantizerError) else 1
        print(f"error: {type(e).__name__}: {_one_line(e)} (set LAYERQUANT_DEBUG=1 for a "
              f"traceback)", file=sys.stderr)
        return code
    finally:
        _restore_sigterm(previous)


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a refusal is one line on stderr, whatever raised it)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _stop_on_sigterm():
    """SIGTERM (kill, a scheduler's stop) stops a run as Ctrl-C does: the job directory is
    unlocked and kept, and the --resume hint is printed. Only in the main thread."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Terminated()
    try:
        return signal.signal(signal.SIGTERM, stop)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous) -> None:
    import signal
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
