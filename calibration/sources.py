"""Where calibration and evaluation text comes from: built-in, local files, or HF `datasets`.

`load_texts(source)` always returns a list of documents (str); callers join them with "\\n\\n".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantizer.errors import InputError

from .builtin_text import builtin_documents

LOCAL_ALTERNATIVE = "--calib-data path/to/file.txt (or .jsonl with a \"text\" field)"


def local_alternative(flag: str = "--calib-data") -> str:
    """The offline way out, spelled with the flag of the command that asked (`quantize eval`
    takes --data, quantize --calib-data)."""
    return LOCAL_ALTERNATIVE.replace("--calib-data", flag)
WIKITEXT_ENV = "LAYERQUANT_WIKITEXT"
WIKITEXT_SHARED = Path("wikitext-2-raw") / "wiki.test.raw"

BUILTIN_SOURCES = {"builtin": "calibration", "builtin-eval": "eval"}
# The second half of WikiText-2 test's rows: in-domain calibration for a perplexity measured
# on the split's first windows when no train split is at hand (offline). Disjoint from an
# evaluation of up to half the split; callers that evaluate more must not use it.
WIKITEXT_TAIL = "wikitext2-tail"

# name -> (load_dataset args, load_dataset kwargs, text field). The splits are the ones the
# AWQ/GPTQ literature uses: pile validation for calibration, WikiText-2 test for perplexity,
# the first C4 validation shard.
HF_DATASETS: dict[str, tuple[tuple[str, ...], dict[str, Any], str]] = {
    "pileval": (("mit-han-lab/pile-val-backup",), {"split": "validation"}, "text"),
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text"),
    "c4": (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
        "text",
    ),
}


def available_sources() -> list[str]:
    return sorted(BUILTIN_SOURCES) + sorted(HF_DATASETS) + [WIKITEXT_TAIL]


def load_texts(source: str, flag: str = "--calib-data") -> list[str]:
    """Documents of `source`: "builtin" / "builtin-eval", a local .txt or .jsonl path, or one of
    the HF dataset names pileval, wikitext2, c4 ("wikitext2" prefers a local copy, see
    `local_wikitext`), or wikitext2-tail (see WIKITEXT_TAIL). `flag`: the option that named
    the source, for messages (--calib-data, or eval's --data)."""
    source = str(source)
    if source in BUILTIN_SOURCES:
        return builtin_documents(BUILTIN_SOURCES[source])
    path = Path(source).expanduser()
    if path.is_file():
        return read_local_file(path)
    if source == WIKITEXT_TAIL:
        rows = load_texts("wikitext2", flag)
        return rows[len(rows) // 2:]
    if source == "wikitext2":
        local = local_wikitext()
        if local is not None:
            return read_wikitext_rows(local)
    if source in HF_DATASETS:
        return _load_hf(source, flag)
    what = "calibration" if flag == "--calib-data" else "evaluation"
    if path.suffix in (".txt", ".jsonl", ".json") or os.sep in source:
        raise InputError(f"{flag}: {what} data file not found: {source}")
    raise InputError(
        f"{flag}: unknown {what} source {source!r}: use one of "
        f"{', '.join(available_sources())} or a path to a .txt / .jsonl file"
    )


# ---- local files -----------------------------------------------------------------------------
def read_local_file(path: Path) -> list[str]:
    """.jsonl: one JSON object per line with a "text" field. Anything else is read as text whose
    documents are separated by blank lines (CRLF and CR line endings normalised)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    documents = _read_jsonl(path, raw) if path.suffix == ".jsonl" else _split_blank_lines(raw)
    if not documents:
        raise InputError(f"{path}: no text found")
    return documents


def _split_blank_lines(raw: str) -> list[str]:
    documents, current = [], []
    for line in raw.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _read_jsonl(path: Path, raw: str) -> list[str]:
    documents = []
    for lineno, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f'{path}:{lineno}: expected an object with a string "text" field')
        if record["text"].strip():
            documents.append(record["text"])
    return documents


# ---- WikiText-2 without the hub ----------------------------------------------------------------
def _search_roots() -> list[Path]:
    here = Path(__file__).resolve().parent
    cwd = Path.cwd().resolve()
    roots = []
    for start in (cwd, here):
        for folder in (start, *start.parents):
            if folder not in roots:
                roots.append(folder)
    return roots


def shared_data_dir() -> Path | None:
    """The nearest `shared/data` folder above the working directory or this package, if any."""
    for folder in _search_roots():
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def local_wikitext() -> Path | None:
    """A local WikiText-2 raw test file: $LAYERQUANT_WIKITEXT, else shared/data/wikitext-2-raw."""
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise InputError(f"{WIKITEXT_ENV}={env} is not a file")
        return path
    shared = shared_data_dir()
    if shared is not None and (shared / WIKITEXT_SHARED).is_file():
        return shared / WIKITEXT_SHARED
    return None


def read_wikitext_rows(path: Path) -> list[str]:
    """The file's non-empty rows, one document each, so that "\\n\\n".join(rows) is as close as
    the file allows to the standard protocol's join over the HF rows (the empty rows are gone)."""
    raw = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    rows = [row for row in raw.split("\n") if row.strip()]
    if not rows:
        raise InputError(f"{path}: no text found")
    return rows


# ---- HF datasets -------------------------------------------------------------------------------
def _load_hf(name: str, flag: str = "--calib-data") -> list[str]:
    args, kwargs, field = HF_DATASETS[name]
    offline = local_alternative(flag)
    if name == "wikitext2":
        offline = f"{WIKITEXT_ENV}=path/to/wiki.test.raw, or {offline}"
    try:
        import datasets  # lazy: an optional dependency that is slow to import
    except ImportError:
        raise InputError(
            f"{flag} {name!r} needs the `datasets` package (pip install datasets); "
            f"offline, use {offline}"
        ) from None
    try:
        table = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, hub errors, missing configs: all mean "cannot get it here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"could not load dataset {name!r} ({reason[:200]}); offline, use {offline}"
        ) from None
    # kept as is, empty rows included: the perplexity protocol joins WikiText-2's rows with them
    return list(table[field])
