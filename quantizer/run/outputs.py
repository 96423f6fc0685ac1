"""What layerquant may write, replace and delete: the user's files are sacred.

Every export and job directory layerquant writes carries a marker file (`.layerquant`, a small
JSON naming what kind of directory it is and, for an export, the files written into it).
Nothing is ever deleted or replaced unless its marker says layerquant wrote it and it holds no
file layerquant did not write: `--overwrite` replaces only our own export, `--resume` deletes
nothing, and an output that is, lies inside or contains the input is refused before any work.

Standard library only: the command line checks paths before torch is imported."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InputError

MARKER = ".layerquant"
EXPORT, JOB = "export", "job"
MEASUREMENT_KIND = "layerquant-measurement"  # "kind" of a measurement.json (measurements/store.py)
_WRITTEN_BY = "layerquant"


class RefusedLate(InputError):
    """A refusal that comes after work a rerun can reuse (the export's place was taken while
    the layers ran, a bits target outside what a fresh measurement offers): the job directory
    is kept, and the message says how to continue."""


# ---- markers ------------------------------------------------------------------------------
def write_marker(directory: Path, kind: str) -> None:
    """Mark `directory` as layerquant's: an export lists the files in it (so a file added
    later by someone else is recognised as theirs), a job directory only says it is one."""
    directory = Path(directory)
    doc: dict = {"written_by": _WRITTEN_BY, "kind": kind}
    if kind == EXPORT:
        doc["files"] = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    (directory / MARKER).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_marker(directory: Path) -> dict | None:
    """The marker of `directory` when it is a valid layerquant marker, else None."""
    try:
        doc = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("written_by") != _WRITTEN_BY:
        return None
    return doc


def foreign_files(directory: Path, kind: str = EXPORT) -> list[str] | None:
    """None when `directory` is not a layerquant `kind` directory (no marker of that kind);
    else the names in it that layerquant did not write ([] when it holds only ours)."""
    doc = read_marker(directory)
    if doc is None or doc.get("kind") != kind:
        return None
    ours = set(doc.get("files") or []) | {MARKER}
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in ours)


# ---- paths --------------------------------------------------------------------------------
def resolved(path) -> Path:
    """Absolute, symbolic links and `..` resolved (the path need not exist)."""
    return Path(os.path.expanduser(str(path))).absolute().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(model, output, work, what: str = "output", inputs: dict | None = None) -> None:
    """Refuse an output or job directory that is the input model, lies inside it or contains
    it, the job directory inside the output (or the other way round), and any other input file
    (`inputs`: {flag: path}, e.g. --measurement) inside the output or the job directory, which
    --overwrite or the end of the run would delete."""
    m, o, w = resolved(model), resolved(output), resolved(work)
    for flag, p in ((what, o), ("job directory (--work-dir)", w)):
        if p == m:
            raise InputError(f"{flag} {p} is the input model itself: choose another path "
                             f"(layerquant never writes into its input)")
        if _inside(p, m):
            raise InputError(f"{flag} {p} lies inside the input model {m}: choose a path "
                             f"outside it (layerquant never writes into its input)")
        if _inside(m, p):
            raise InputError(f"{flag} {p} contains the input model {m}: writing there would "
                             f"replace it; choose a new directory beside the model")
    if _inside(w, o) or _inside(o, w):
        raise InputError(f"job directory {w} and {what} {o} overlap: choose a --work-dir "
                         f"outside the output")
    for flag, path in (inputs or {}).items():
        p = resolved(path)
        for name, d in ((what, o), ("job directory", w)):
            if _inside(p, d):
                raise InputError(f"{flag} {p} lies inside the {name} {d}, which this run "
                                 f"replaces or deletes: copy it elsewhere first")


def check_output_dir(output: Path, overwrite: bool, resume: bool, may_replace: bool) -> None:
    """Whether this run may publish its export at `output`: absent or empty, or our own export
    with --overwrite (or --resume of a job started with --overwrite: `may_replace`). Never a
    file, never a directory holding files layerquant did not write."""
    output = Path(output)
    if output.is_symlink():
        raise InputError(f"output {output} is a symbolic link: name the directory itself")
    if not output.exists():
        return
    if not output.is_dir():
        raise InputError(f"output {output} is a file, not a directory: choose a directory "
                         f"path for the export")
    names = sorted(p.name for p in output.iterdir())
    if not names:
        return
    foreign = foreign_files(output, EXPORT)
    if foreign is None:
        raise InputError(f"output {output} holds files layerquant did not write "
                         f"({_some(names)}); they are never replaced: choose a new or empty "
                         f"output directory")
    if foreign:
        raise InputError(f"output {output} is a layerquant export but also holds files "
                         f"layerquant did not write ({_some(foreign)}): move them out or choose "
                         f"another output directory")
    if overwrite or (resume and may_replace):
        return
    if resume:
        raise InputError(f"output {output} already holds an export that no job here was "
                         f"started to replace (--resume never deletes); pass --overwrite to "
                         f"replace it")
    raise InputError(f"output {output} exists; pass --overwrite to replace it")


def remove_export(output: Path) -> None:
    """Delete our own export at `output` before a new one takes its place; refuses (RefusedLate:
    the finished layers stay in the job directory) when it is not ours or holds other files."""
    output = Path(output)
    if not output.exists() and not output.is_symlink():
        return
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        output.rmdir()
        return
    foreign = foreign_files(output, EXPORT) if output.is_dir() and not output.is_symlink() \
        else None
    if foreign is None or foreign:
        raise RefusedLate(f"output {output} now holds files layerquant did not write "
                          f"({_some(foreign or [output.name])}); nothing was replaced and the "
                          f"finished layers are kept: move them out and rerun with --resume")
    shutil.rmtree(output)


def check_measurement_output(output: Path, overwrite: bool, resume: bool,
                             has_job: bool) -> None:
    """`quantize measure -o FILE`: a file path, replaced only when it is a layerquant
    measurement and --overwrite (or --resume of a job) says so."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"output {output} is a directory: name the measurement file "
                         f"(e.g. -o measurement.json)")
    if not output.exists():
        return
    try:
        ours = json.loads(output.read_text()).get("kind") == MEASUREMENT_KIND
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise InputError(f"output {output} exists and is not a layerquant measurement: it is "
                         f"never replaced; choose another file name")
    if not (overwrite or (resume and has_job)):
        raise InputError(f"output {output} exists; pass --overwrite to replace it")


def _some(names: list[str], n: int = 3) -> str:
    more = f", … {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def local_model_path(text: str) -> Path | None:
    """The model argument as a local directory, None when it may be a hub id (org/name);
    InputError when it names a local path that does not exist. No torch needed."""
    p = Path(os.path.expanduser(str(text)))
    if p.exists():
        return p
    s = str(text)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not s.endswith("/"):
        return None
    raise InputError(f"model path does not exist: {p}")


def input_files(settings) -> dict[str, str]:
    """Files besides the model that a run reads (settings: QuantSettings): they must not lie
    where it writes."""
    files = {}
    if settings.measurement:
        files["--measurement"] = settings.measurement
    if Path(str(settings.calib.source)).expanduser().is_file():
        files["--calib-data"] = str(settings.calib.source)
    return files
