"""Crash-safe files: every write goes to a temporary name in the same directory, is fsynced,
renamed over the real name, and the directory is fsynced. A reader therefore sees either the
previous complete file or the new complete file, never a partial one, whatever kills us.

Temporaries are named `.<name>.tmp-<pid>`; `is_temporary` / `list_files` let readers skip them
and `remove_temporaries` clears those a killed run left behind (call it while holding the job
lock, so no live writer owns them).

`inject_write_failure(after_bytes)` makes the writers here fail with ENOSPC after that many
bytes (counted across all files written inside the context), which is how the tests simulate a
full disk mid-write."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError, QuantizerError

CHUNK = 16 * 2**20  # bytes per os.write: bounds the extra memory of a write to one chunk

# safetensors dtype names; https://github.com/huggingface/safetensors (format spec in README)
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")

_fail_budget: int | None = None  # bytes left before an injected ENOSPC; None = no injection


class WriteFailed(QuantizerError):
    """A write could not complete (disk full, I/O error). The previous file is intact."""


@contextlib.contextmanager
def inject_write_failure(after_bytes: int) -> Iterator[None]:
    """Test hook: writes inside this context raise OSError(ENOSPC) once `after_bytes` bytes
    (counted over every file written in the context) have gone to disk."""
    global _fail_budget
    old, _fail_budget = _fail_budget, int(after_bytes)
    try:
        yield
    finally:
        _fail_budget = old


def is_temporary(name: str | os.PathLike) -> bool:
    return bool(_TMP_RE.match(Path(name).name))


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def list_files(directory: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Files matching `pattern` in `directory`, sorted, without our temporaries."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(pattern) if p.is_file() and not is_temporary(p))


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries (recursively) left by killed writers. Only call under the job lock."""
    removed = []
    for p in Path(directory).rglob(".*.tmp-*"):
        if p.is_file() and is_temporary(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data) -> None:
    """os.write until done, honouring the injected failure budget."""
    _write_chunks(lambda chunk, done: os.write(fd, chunk), data)


def write_at(fd: int, data, offset: int) -> None:
    """os.pwrite until `data` is at `offset` (files written in place: the export's shards),
    honouring the injected failure budget like every other writer here."""
    _write_chunks(lambda chunk, done: os.pwrite(fd, chunk, offset + done), data)


def _write_chunks(write, data) -> None:
    """write(chunk, bytes done so far) -> bytes written, in chunks of at most CHUNK until all
    of `data` is written; an injected failure writes what its budget allows, then raises
    ENOSPC."""
    global _fail_budget
    view = memoryview(data).cast("B")
    done = 0
    while len(view):
        n = min(len(view), CHUNK)
        if _fail_budget is not None and n > _fail_budget:
            if _fail_budget > 0:
                write(view[:_fail_budget], done)
            _fail_budget = 0
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        written = write(view[:n], done)
        if _fail_budget is not None:
            _fail_budget -= written
        view = view[written:]
        done += written


@contextlib.contextmanager
def _atomic_fd(path: str | os.PathLike) -> Iterator[int]:
    """Yield an fd of a temporary beside `path`; on clean exit fsync + rename + fsync dir, on any
    error delete the temporary and leave `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteFailed(f"writing {path} failed: {e.strerror or e}; the previous "
                              f"version of the file is intact") from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _atomic_fd(path) as fd:
        _write_all(fd, data)


def atomic_write_json(path: str | os.PathLike, obj, sort_keys: bool = True) -> None:
    """Human-readable (indent=1; sorted keys unless the caller's order means something)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode())


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (readable by safetensors.safe_open) without building the whole
    file in memory: header, then each tensor's bytes streamed to the temporary."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # keeps alignment
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec pads the header so data starts 8-aligned
    with _atomic_fd(path) as fd:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for name in order:
            if tensors[name].numel():
                _write_all(fd, _tensor_bytes(tensors[name]))


# ---- readers -------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; a broken one is an InputError naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not text (byte {e.start}): corrupt file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file ends early: truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise InputError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}{hint}") from None


def load_tensors(path: str | os.PathLike, what: str = "file",
                 device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file fully (tensors and metadata); corrupt → InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} is missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{what} {path} is corrupt: {e}") from None


HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on a header's length


def safetensors_header(path: Path) -> tuple[bytes, dict]:
    """A safetensors file's header without its tensor data: (the bytes, length prefix
    included; the parsed JSON). ValueError says what is wrong: shorter than the length prefix,
    a length that does not fit the file, a header that is not JSON, or tensor data declared
    past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > min(size - 8, HEADER_LIMIT):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        text = f.read(n)
    header = json.loads(text)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + n + end > size:
        raise ValueError("tensor data runs past the end of the file (truncated?)")
    return raw + text, header


def read_safetensors_metadata(path: str | os.PathLike, what: str = "file") -> dict[str, str]:
    """Parse only the header of a safetensors file (cheap: no tensor data is read) and check the
    file is long enough for the data it declares; returns the `__metadata__` dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} is missing")
    try:
        return dict(safetensors_header(path)[1].get("__metadata__") or {})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is corrupt: {e}") from None
