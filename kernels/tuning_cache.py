"""On-disk cache of the kernel dispatch's tuning results, one JSON file per GPU kind.

A file holds the choices measured on one kind of GPU (name, compute capability, SM count:
`device_key`), and is read only by a process on that same kind: an H100's choices are never
used on an H200. Each file also records the versions the timings depend on (torch, triton,
the kernels' source); when any differs, its entries are ignored and re-measured.

Directory: $LAYERQUANT_KERNEL_CACHE, else $XDG_CACHE_HOME/layerquant/kernels, else
~/.cache/layerquant/kernels. Writes are atomic (temporary file + rename); a cache that
cannot be read or written only costs re-tuning (logged), never a failed forward.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

try:
    import triton
except Exception:  # noqa: BLE001 -- the cache is also read without triton (nothing to tune)
    triton = None

logger = logging.getLogger(__name__)

_FILES: dict[tuple, "TuningFile"] = {}


def cache_dir() -> Path:
    env = os.environ.get("LAYERQUANT_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerquant" / "kernels"


def _slug(device_key: tuple) -> str:
    text = "-".join(str(v) for v in device_key)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def code_version() -> str:
    """Hash of the kernel and dispatch sources: a change to either re-tunes."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("triton_w4a16.py", "triton_dispatch.py", "tinygemm.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:16]


def _versions() -> dict:
    tv = getattr(triton, "__version__", None)
    return {"torch": torch.__version__, "triton": tv, "code": code_version()}


class TuningFile:
    """The cached choices of one GPU kind: {key: config dict}."""

    def __init__(self, device_key: tuple, directory: Path | None = None):
        self.device_key = tuple(device_key)
        self.path = (directory or cache_dir()) / f"tune-{_slug(self.device_key)}.json"
        self.versions = _versions()
        self.entries: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable kernel tuning cache %s: %s", self.path, exc)
            return
        if tuple(data.get("device", ())) != self.device_key:
            logger.warning("kernel tuning cache %s is for %s, not %s: ignored", self.path,
                           data.get("device"), self.device_key)
            return
        if data.get("versions") != self.versions:
            logger.info("kernel tuning cache %s was made with %s (now %s): re-tuning",
                        self.path, data.get("versions"), self.versions)
            return
        self.entries = dict(data.get("entries", {}))

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        data = {"device": list(self.device_key), "versions": self.versions,
                "entries": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write kernel tuning cache %s: %s", self.path, exc)


def tuning_file(device_key: tuple) -> TuningFile:
    """The (per process, per GPU kind) TuningFile of `device_key` in today's cache_dir()."""
    key = (tuple(device_key), str(cache_dir()))
    f = _FILES.get(key)
    if f is None:
        f = _FILES[key] = TuningFile(device_key)
    return f


def forget_loaded() -> None:
    """Drop the in-memory copies (tests; a changed LAYERQUANT_KERNEL_CACHE)."""
    _FILES.clear()
