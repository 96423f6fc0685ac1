"""The Python API: `quantize`, `measure`, `evaluate`, `load` — the same code paths as the CLI."""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
from pathlib import Path

from . import evaluation as _evaluation
from . import loader as _loader
from .config import CalibSettings, QuantSettings, default_method
from .errors import InputError
from .evaluation import EvalResult
from .options import OPTIONS, check_positive_size
from .outputs import check_paths, local_model_path
from .pipeline import check_output, input_files, run_quantize
from .report import QuantResult


def checked_keywords(fn):
    """A mistyped keyword is an InputError (a ValueError) naming it and the nearest right
    one, like every other bad argument, not a TypeError from deep inside. Keywords that go
    on to a method's options (quantize's **method_options) are checked against options.py."""
    sig = inspect.signature(fn)
    named = [n for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_options = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for key in kwargs:
            if key in named or (takes_options and key in OPTIONS):
                continue
            known = named + (sorted(OPTIONS) if takes_options else [])
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise InputError(f"{fn.__name__}() has no keyword argument {key!r}{hint}")
        return fn(*args, **kwargs)
    return wrapper


def resolve_model(path_or_id: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (weights + configs only)."""
    local = local_model_path(path_or_id)
    if local is not None:
        return local
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path_or_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "merges.txt"]))
    except Exception as e:  # offline, unknown repo, no access
        raise InputError(f"model path does not exist and {path_or_id!r} could not be "
                         f"fetched from the hub ({type(e).__name__}); pass a local "
                         "directory") from None


@checked_keywords
def quantize(model: str, output: str, bits: float = 4, group_size="auto",
             method: str | None = None,
             symmetric: bool | None = None, calib_data: str = "builtin", calib_samples: int = 128,
             calib_seqlen: int = 512, seed: int = 0, device: str = "auto", dtype: str = "auto",
             export_format: str = "auto", overwrite: bool = False, resume: bool = False,
             work_dir=None, progress: bool = True, max_shard_bytes: int = 1 << 30, log=None,
             vram_budget: str | None = None, ram_budget: str | None = None,
             save_hidden: str = "auto", measurement: str | None = None,
             adaptive: bool = False, hessian_device: str = "auto", hidden_device: str = "auto",
             tp_size: int | None = None, pad_for_tp: int | None = None,
             devices: str | list | None = None, calib_shards: int = 8,
             min_expert_tokens: int = 16, engine: str = "vllm",
             **method_options) -> QuantResult:
    """Quantize `model` into `output`; returns a result that renders as a per-layer table.

    method: rtn, awq or gptq; default as on the command line (AWQ for 4 bits when available,
    GPTQ otherwise, adaptive GPTQ for fractional targets).

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
    torch.distributed (quantizer/distributed.py); the output is bit-identical to one
    process's. calib_shards: the calibration set's shard count, which bounds the processes."""
    from . import distributed as D
    from .warmup import configure_caches

    configure_caches()
    if method is None:
        method = default_method(bits, adaptive or bool(measurement))
    device_list = D.parse_devices(devices) if isinstance(devices, (str, type(None))) else \
        D.parse_devices(",".join(map(str, devices)))
    if device_list:
        D.require_devices(device_list)
    if device_list and len(device_list) == 1:
        device = device_list[0]
    settings = QuantSettings(
        bits=bits, group_size=group_size, method=method, symmetric=symmetric,
        calib=CalibSettings(calib_data, calib_samples, calib_seqlen, seed, calib_shards),
        device=device,
        dtype=dtype, export_format=export_format, method_options=method_options,
        vram_budget=vram_budget, ram_budget=ram_budget, save_hidden=save_hidden,
        measurement=str(measurement) if measurement else None, adaptive=adaptive,
        hessian_device=hessian_device, hidden_device=hidden_device, tp_size=tp_size,
        pad_for_tp=pad_for_tp, min_expert_tokens=min_expert_tokens, engine=engine)
    if device_list and len(device_list) > 1 and not D.world().distributed:
        # refuse before any process starts: settings, paths, the output
        model_path = resolve_model(str(model))
        check_settings = copy.deepcopy(settings)
        check_settings.validate()
        check_positive_size("--max-shard-size", max_shard_bytes)
        out = Path(output).absolute()
        work = Path(work_dir).absolute() if work_dir else out.parent / (out.name + ".job")
        check_paths(model_path, out, work, inputs=input_files(check_settings))
        check_output(out, work, overwrite, resume)
        kwargs = {k: v for k, v in locals().items()
                  if k in _QUANTIZE_ARGS and k not in ("devices", "log")}
        kwargs["model"] = str(model_path)  # fetched once, not once per process
        kwargs.update(method_options)
        return D.launch(device_list, _quantize_worker, kwargs, log is not None)
    return run_quantize(resolve_model(str(model)), output, settings, progress=progress,
                        overwrite=overwrite, resume=resume, work_dir=work_dir,
                        max_shard_bytes=max_shard_bytes, log=log)


@checked_keywords
def measure(model: str, output: str, calib_data: str = "builtin", calib_samples: int = 128,
            calib_seqlen: int = 512, seed: int = 0, symmetric: bool | None = None,
            group_size="auto", device: str = "auto", dtype: str = "auto",
            overwrite: bool = False, resume: bool = False, work_dir=None, progress: bool = True,
            log=None, vram_budget: str | None = None, ram_budget: str | None = None,
            hessian_device: str = "auto", hidden_device: str = "auto", calib_shards: int = 8,
            **method_options) -> dict:
    """Adaptive GPTQ's measurement pass alone: per layer and module group, the error and exact
    cost of every candidate setting, written to the file `output` (measurement.json). Then
    `quantize(model, out, bits=<any target>, measurement=output)` allocates bits from it with
    no second measuring pass. GPTQ options (act_order, static_groups, damp) go in
    `method_options` and must match the later quantize calls'. Returns a summary dict."""
    from .adaptive import run_measure
    settings = QuantSettings(
        bits=4, group_size=group_size, method="gptq", symmetric=symmetric,
        calib=CalibSettings(calib_data, calib_samples, calib_seqlen, seed, calib_shards),
        device=device, dtype=dtype, method_options=method_options, vram_budget=vram_budget,
        ram_budget=ram_budget, adaptive=True, hessian_device=hessian_device,
        hidden_device=hidden_device)
    return run_measure(resolve_model(str(model)), output, settings, progress=progress,
                       overwrite=overwrite, resume=resume, work_dir=work_dir, log=log)


_QUANTIZE_ARGS = ("model", "output", "bits", "group_size", "method", "symmetric", "calib_data",
                  "calib_samples", "calib_seqlen", "seed", "device", "dtype", "export_format",
                  "overwrite", "resume", "work_dir", "progress", "max_shard_bytes",
                  "vram_budget", "ram_budget", "save_hidden", "measurement", "adaptive",
                  "hessian_device", "hidden_device", "tp_size", "pad_for_tp", "calib_shards",
                  "min_expert_tokens", "engine")


def _log_stderr(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr)


def _quantize_worker(kwargs: dict, logging: bool) -> QuantResult:
    """One process of a multi-device run (started by quantizer.distributed.launch)."""
    return quantize(**kwargs, log=_log_stderr if logging else None)


evaluate = checked_keywords(_evaluation.evaluate)
load = checked_keywords(_loader.load)

__all__ = ["quantize", "measure", "evaluate", "load", "QuantResult", "EvalResult", "resolve_model"]
