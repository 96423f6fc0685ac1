"""The Python API: `quantize`, `measure`, `evaluate`, `load` — the same code paths as the CLI."""
from __future__ import annotations

from pathlib import Path

from .config import CalibSettings, QuantSettings
from .errors import InputError
from .evaluation import EvalResult, evaluate
from .loader import load
from .pipeline import run_quantize
from .report import QuantResult


def resolve_model(path_or_id: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (weights + configs only)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    if path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(path_or_id, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "merges.txt"]))
        except Exception as e:  # offline, unknown repo, no access
            raise InputError(f"model path does not exist and {path_or_id!r} could not be "
                             f"fetched from the hub ({type(e).__name__}); pass a local "
                             "directory") from None
    raise InputError(f"model path does not exist: {p}")


def quantize(model: str, output: str, bits: float = 4, group_size="auto", method: str = "rtn",
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

    Work is checkpointed after every layer in `work_dir` (default OUTPUT.job); after a crash
    or Ctrl-C, call again with resume=True to continue from the last finished layer.

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

    device_list = D.parse_devices(devices) if isinstance(devices, (str, type(None))) else \
        D.parse_devices(",".join(map(str, devices)))
    if device_list and len(device_list) == 1:
        device = device_list[0]
    elif device_list and not D.world().distributed:
        _settings_for_check(locals(), method_options).validate()  # refuse before any process starts
        kwargs = {k: v for k, v in locals().items()
                  if k in _QUANTIZE_ARGS and k not in ("devices", "log")}
        kwargs.update(method_options)
        return D.launch(device_list, _quantize_worker, kwargs, log is not None)
    settings = QuantSettings(
        bits=bits, group_size=group_size, method=method, symmetric=symmetric,
        calib=CalibSettings(calib_data, calib_samples, calib_seqlen, seed, calib_shards),
        device=device,
        dtype=dtype, export_format=export_format, method_options=method_options,
        vram_budget=vram_budget, ram_budget=ram_budget, save_hidden=save_hidden,
        measurement=str(measurement) if measurement else None, adaptive=adaptive,
        hessian_device=hessian_device, hidden_device=hidden_device, tp_size=tp_size,
        pad_for_tp=pad_for_tp, min_expert_tokens=min_expert_tokens, engine=engine)
    return run_quantize(resolve_model(str(model)), output, settings, progress=progress,
                        overwrite=overwrite, resume=resume, work_dir=work_dir,
                        max_shard_bytes=max_shard_bytes, log=log)


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


def _settings_for_check(args: dict, method_options: dict) -> QuantSettings:
    return QuantSettings(bits=args["bits"], group_size=args["group_size"], method=args["method"],
                         symmetric=args["symmetric"], method_options=dict(method_options),
                         measurement=args["measurement"], adaptive=args["adaptive"],
                         tp_size=args["tp_size"], pad_for_tp=args["pad_for_tp"],
                         engine=args["engine"])


def _log_stderr(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr)


def _quantize_worker(kwargs: dict, logging: bool) -> QuantResult:
    """One process of a multi-device run (started by quantizer.distributed.launch)."""
    return quantize(**kwargs, log=_log_stderr if logging else None)


__all__ = ["quantize", "measure", "evaluate", "load", "QuantResult", "EvalResult", "resolve_model"]
