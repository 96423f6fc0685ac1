"""The Python API: `quantize`, `measure`, `evaluate`, `load` — the same code paths as the CLI.

`quantize` and `measure` take a whole `QuantSettings` (what the command line builds), and any
setting as a keyword for convenience (bits=3, calib_data="wikitext2", vram_budget="40G",
damp=0.05: keywords replace those of `settings`)."""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import fields, replace
from pathlib import Path

from huggingface_hub import snapshot_download

from . import logs
from .adaptive.stage import run_measure
from .errors import InputError
from .parallel.distributed import launch, resolve_devices, world
from .plan.machine import visible_gpu_memory
from .run.caches import configure_caches
from .run.jobdir import check_output
from .run.outputs import check_paths, input_files, local_model_path
from .run.quantize import run_quantize
from .run.report import QuantResult
from .settings import OPTION_FIELDS, SETTING_KEYWORDS, OutputSettings, QuantSettings
from .validate import evaluation as _evaluation, loader as _loader
from .validate.evaluation import EvalResult

# what `quantize measure` reads of the settings (the API's keywords of `measure`)
MEASURE_KEYWORDS = ("calib_data", "calib_samples", "calib_seqlen", "seed", "calib_shards",
                    "symmetric", "group_size", "device", "dtype", "vram_budget", "ram_budget",
                    "hessian_device", "hidden_device", "damp", "act_order", "static_groups")
_MEASURE_FIELDS = {"calib", "symmetric", "group_size", "device", "dtype", "budgets",
                   "hessian_device", "hidden_device", "gptq", "method", "adaptive"}


def checked_keywords(known=()):
    """A mistyped keyword is an InputError (a ValueError) naming it and the nearest right
    one, like every other bad argument, not a TypeError from deep inside. `known`: the
    keywords a **keywords parameter takes besides the named ones."""
    def decorate(fn):
        sig = inspect.signature(fn)
        named = [n for n, p in sig.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted = set(named) | set(known)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for key in kwargs:
                if key not in accepted:
                    near = difflib.get_close_matches(key, sorted(accepted), n=1)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    raise InputError(f"{fn.__name__}() has no keyword argument {key!r}{hint}")
            return fn(*args, **kwargs)
        return wrapper
    return decorate


def resolve_model(path_or_id: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (weights + configs only)."""
    local = local_model_path(path_or_id)
    if local is not None:
        return local
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "merges.txt"]))
    except Exception as e:  # offline, unknown repo, no access
        raise InputError(f"model path does not exist and {path_or_id!r} could not be "
                         f"fetched from the hub ({type(e).__name__}); pass a local "
                         "directory") from None


@checked_keywords(SETTING_KEYWORDS + tuple(OPTION_FIELDS))
def quantize(model: str, output: str, settings: QuantSettings | None = None, *,
             overwrite: bool = False, resume: bool = False, work_dir=None,
             max_shard_bytes: int = 1 << 30, progress: bool = True,
             **keywords) -> QuantResult:
    """Quantize `model` into `output`; returns a result that renders as a per-layer table.

    settings: a QuantSettings (every setting, typed); keywords: any setting by name as a
    convenience (bits=3, method="gptq", calib_data="wikitext2", vram_budget="40G",
    devices="0,1", damp=0.05, grid=10, ...), replacing those of `settings`.

    method: rtn, awq or gptq; default as on the command line (AWQ for 4 bits, GPTQ
    otherwise, adaptive GPTQ for fractional targets).

    Work is checkpointed after every layer in `work_dir` (default OUTPUT.job); after a crash
    or Ctrl-C, call again with resume=True to continue from the last finished layer.
    overwrite=True replaces an existing export only when layerquant wrote it.

    Bad arguments raise quantizer.errors.InputError (a ValueError) with the one line the
    command line prints, before anything is written.

    tp_size=N refuses before any work unless the export loads under tensor parallelism N;
    pad_for_tp=N zero-pads the MLP intermediate width so that it does (exact).

    symmetric=None takes the export format's serving default (asymmetric for AWQ's layout,
    symmetric for GPTQ and compressed-tensors); engine="vllm" checks vLLM's load-time rules
    before any work and before publishing (engine="none" skips them).

    MoE: an expert routed fewer than min_expert_tokens calibration tokens is rounded to
    nearest instead of calibrated (with a warning; the report lists tokens per expert).

    devices="0,1" (or "all", or "cpu,cpu") runs one process per device through
    torch.distributed (parallel/distributed.py); the output is bit-identical to one
    process's. calib_shards: the calibration set's shard count, which bounds the processes."""
    settings = (settings or QuantSettings()).replaced(**keywords)
    out = OutputSettings(Path(output), work_dir, overwrite, resume, max_shard_bytes)
    return quantize_with(model, settings, out, progress)


def quantize_with(model: str, settings: QuantSettings, out: OutputSettings,
                  progress: bool = True) -> QuantResult:
    """`quantize` with its settings and outputs built (what the command line calls)."""
    configure_caches()  # before anything imports triton
    devices = resolve_devices(settings.devices)
    if devices and len(devices) > 1 and not world().distributed:
        return _launch(model, replace(settings, devices=tuple(devices)), out, progress)
    if devices and len(devices) == 1:
        settings = replace(settings, device=devices[0], devices=None)
    return run_quantize(resolve_model(str(model)), settings, out, progress)


def _launch(model: str, settings: QuantSettings, out: OutputSettings, progress: bool
            ) -> QuantResult:
    """One process per device; refuse before any starts: settings, paths, the output."""
    model_path = resolve_model(str(model))  # fetched once, not once per process
    settings, out = settings.validated(), out.validated()
    settings.budgets.check_totals(visible_gpu_memory())
    check_paths(model_path, out.output, out.work, inputs=input_files(settings))
    check_output(out.output, out.work, out.overwrite, out.resume)
    assert settings.devices is not None  # quantize_with launches for several devices only
    return launch(list(settings.devices), _quantize_worker, model_path, settings, out, progress,
                  logs.configured_level())


def _quantize_worker(model_path, settings: QuantSettings, out: OutputSettings, progress: bool,
                     log_level: int | None) -> QuantResult:
    """One process of a multi-device run (started by parallel.distributed.launch): the same
    settings, unchanged; rank 0 logs as the command line does."""
    if log_level is not None and world().main:
        logs.configure(log_level)
    return run_quantize(model_path, settings, out, progress)


@checked_keywords(MEASURE_KEYWORDS)
def measure(model: str, output: str, settings: QuantSettings | None = None, *,
            overwrite: bool = False, resume: bool = False, work_dir=None,
            progress: bool = True, **keywords) -> dict:
    """Adaptive GPTQ's measurement pass alone: per layer and module group, the error and exact
    cost of every candidate setting, written to the file `output` (measurement.json). Then
    `quantize(model, out, bits=<any target>, measurement=output)` allocates bits from it with
    no second measuring pass. The GPTQ options (act_order, static_groups, damp) must match the
    later quantize calls'. Returns a summary dict."""
    settings = (settings or QuantSettings()).replaced(**keywords)
    check_measure_settings(settings)
    out = OutputSettings(Path(output), work_dir, overwrite, resume)
    return run_measure(resolve_model(str(model)), settings, out, progress)


def check_measure_settings(settings: QuantSettings) -> None:
    """A setting `quantize measure` does not use is refused rather than silently ignored."""
    default = QuantSettings()
    for f in fields(QuantSettings):
        if f.name not in _MEASURE_FIELDS and getattr(settings, f.name) != getattr(default,
                                                                                   f.name):
            raise InputError(f"quantize measure does not use {f.name} (it measures every "
                             f"candidate setting; give it to the quantize run that uses the "
                             f"measurement)")
    if settings.method not in (None, "gptq"):
        raise InputError(f"quantize measure measures GPTQ candidates, not --method "
                         f"{settings.method}")


evaluate = checked_keywords()(_evaluation.evaluate)
load = checked_keywords()(_loader.load)

__all__ = ["quantize", "measure", "evaluate", "load", "QuantResult", "EvalResult", "resolve_model",
           "QuantSettings", "OutputSettings"]
