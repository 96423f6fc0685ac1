"""Fingerprints that decide whether saved work may be reused: model files, calibration tokens,
and the settings that change the result. A job fingerprint is a dict {model, calibration,
settings} that keeps the settings themselves (not only a hash), so a mismatch can be reported
as "group_size: 128 -> 64" rather than "settings differ"."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import InputError
from .atomic import safetensors_header

SAMPLE_BYTES = 64 * 2**10  # bytes read at each sample point of a shard's data
SAMPLE_POINTS = 8  # evenly spaced points per shard, first and last included
_MODEL_FILES = ("config.json", "model.safetensors.index.json")


def _safetensors_header(path: Path) -> bytes:
    try:
        return safetensors_header(path)[0]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"corrupt safetensors file {path}: {e}") from None


def fingerprint_model(model_dir: str | os.PathLike) -> str:
    """Hash of a checkpoint directory: config.json, the safetensors index, and for every shard
    its name, its size, its full header (names, dtypes, shapes, offsets, metadata) and 8 samples
    of 64 KiB spread over its tensor data.

    It deliberately does NOT read all weight bytes: hashing 100+ GB would take minutes on every
    start and every resume. What it catches: a different model, a different revision or
    conversion (headers or sizes change), re-saved or retyped shards, and most in-place edits
    of the data (the samples). What it can miss: an in-place edit of weight bytes that keeps
    size and header and avoids the sampled ranges."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"model path is not a directory: {d}")
    h = hashlib.sha256(b"layerquant-model-v1\0")
    for name in _MODEL_FILES:
        p = d / name
        if p.is_file():
            h.update(f"{name}\0".encode())
            h.update(p.read_bytes())
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise InputError(f"no safetensors weights in {d}")
    for shard in shards:
        size = shard.stat().st_size
        header = _safetensors_header(shard)
        h.update(f"\0{shard.name}\0{size}\0".encode())
        h.update(header)
        start, span = len(header), max(0, size - len(header) - SAMPLE_BYTES)
        with open(shard, "rb") as f:
            for i in range(SAMPLE_POINTS):
                f.seek(start + span * i // max(1, SAMPLE_POINTS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]


def fingerprint_calibration(tokens: torch.Tensor | Iterable[torch.Tensor]) -> str:
    """Hash of the calibration token ids (and their shapes): a different text source, sample
    count, sequence length, seed or tokenizer all change it."""
    h = hashlib.sha256(b"layerquant-calib-v1\0")
    parts = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    for t in parts:
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(f"{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def normalise_settings(settings: Mapping[str, Any]) -> dict:
    """The settings as they will read back from JSON (tuples → lists, paths → str), so a saved
    and a fresh fingerprint compare equal when nothing changed."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def job_fingerprint(model: str, calibration: str | None, settings: Mapping[str, Any]) -> dict:
    """`model`/`calibration` are hashes from the functions above (calibration None when the
    method uses no calibration data); `settings` holds every setting that changes the result
    and nothing else (device, chunking, paths to outputs must be left out by the caller)."""
    return {"model": model, "calibration": calibration, "settings": normalise_settings(settings)}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


def _show(v: Any) -> str:
    return "(not set)" if v is _MISSING else json.dumps(v, sort_keys=True)


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a saved and a fresh job fingerprint; [] if equal."""
    diffs = []
    if old.get("model") != new.get("model"):
        diffs.append("the model files differ (config.json or safetensors shards changed)")
    if old.get("calibration") != new.get("calibration"):
        diffs.append("the calibration set differs (different token ids: source, samples, "
                     "sequence length, seed or tokenizer)")
    a = _flatten(normalise_settings(old.get("settings") or {}))
    b = _flatten(normalise_settings(new.get("settings") or {}))
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            diffs.append(f"setting {key}: {_show(va)} -> {_show(vb)}")
    return diffs


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    """A short hash of a whole job fingerprint, stamped into files the job writes."""
    blob = json.dumps(normalise_settings(fp), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
