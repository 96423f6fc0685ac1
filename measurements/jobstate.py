"""A job directory: what makes a multi-hour run resumable after a kill, an OOM or a reboot.

    <job>/lock                              flock'ed by the one process working here
    <job>/state.json                        stage, last finished layer per stage, fingerprint
    <job>/layers/<stage>-<index:05d>.safetensors   a finished layer's output for that stage
    <job>/hidden/<stage>-<index:05d>.safetensors   hidden states entering layer <index>

Protocol for one layer (the order is what makes a kill lose at most one layer of work):
    job.save_layer(stage, i, tensors, meta)      # durable, under its real name
    job.save_hidden(i + 1, next_inputs)          # durable; the inputs of layer i stay too
    job.commit_layer(stage, i)                   # state.json says i is finished, then the
                                                 # hidden states of layer i are deleted
A kill before commit_layer redoes layer i from the hidden states still on disk; a kill after
it starts at layer i + 1. Every file goes through measurements.atomic (temp + fsync + rename).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError, QuantizerError
from ..run.outputs import JOB, MARKER, read_marker, write_marker
from .atomic import (atomic_save_tensors, atomic_write_json, list_files, load_tensors,
                     read_json, read_safetensors_metadata, remove_temporaries)
from .fingerprint import fingerprint_differences, fingerprint_digest

SCHEMA_VERSION = 1
STAGES = ("measure", "quantize", "export", "done")
WORK_STAGES = STAGES[:-1]
STATE_NAME = "state.json"
LOCK_NAME = "lock"
LAYERS_DIR = "layers"
HIDDEN_DIR = "hidden"
_META_KEY = "layerquant"  # safetensors metadata key holding our JSON-encoded layer metadata
FINAL_DIR = "final"  # the export being assembled (pipeline.py)
MEASUREMENT_NAME = "measurement.json"  # adaptive GPTQ's measurement (adaptive.py)
OWN_ENTRIES = frozenset({STATE_NAME, LOCK_NAME, LAYERS_DIR, HIDDEN_DIR, FINAL_DIR,
                         MEASUREMENT_NAME, MARKER})


def _missing_parents(path: Path) -> list[Path]:
    """The folders mkdir(parents=True) would create for `path`, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _stamped(path: Path) -> bool:
    """Whether a safetensors file carries a job's stamp (written by JobDir)."""
    try:
        return _META_KEY in read_safetensors_metadata(path, "layer file")
    except InputError:
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state: dict | None = None
        self._lock_fd: int | None = None
        self.fresh = False  # begin() started a new job here (nothing resumed)
        self._made_dirs: list[Path] = []  # what lock() created, undone when begin() refuses
        self._made_lock = False

    # ---- lock ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock (flock on <job>/lock); another holder → InputError naming
        its pid. The kernel drops the lock when the process dies, so a killed run never leaves
        a stale lock behind."""
        if self._lock_fd is not None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"job directory {self.path} exists and is not a directory")
        self._made_dirs = _missing_parents(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._made_lock = not (self.path / LOCK_NAME).exists()
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"job directory {self.path} is in use by pid {holder} (another "
                                 f"quantize run); wait for it to finish or stop it") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "JobDir":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise QuantizerError(f"internal: job directory {self.path} used without its lock")

    # ---- start / resume ------------------------------------------------------------------
    def begin(self, fingerprint: Mapping[str, Any], resume: bool = False,
              overwrite: bool = False, first_stage: str = "measure") -> dict:
        """Lock the directory and create, continue or restart the job in it. Returns the state.

        new or empty directory → a fresh job (also with resume: nothing to resume is fine);
        existing job without resume/overwrite → InputError saying how to do either;
        resume with a different fingerprint → InputError listing what differs;
        overwrite → everything but the lock is deleted and a fresh job starts."""
        if resume and overwrite:
            raise InputError("--resume and --overwrite contradict each other: pass --resume to "
                             "continue the job or --overwrite to start over, not both")
        if first_stage not in WORK_STAGES:
            raise ValueError(f"first_stage must be one of {WORK_STAGES}, got {first_stage!r}")
        had_lock = self._lock_fd is not None
        self.lock()
        try:
            return self._begin_locked(fingerprint, resume, overwrite, first_stage)
        except BaseException:
            if not had_lock:  # a refused start must not keep the directory locked...
                self.unlock()
                self._undo_lock()  # ...nor leave a lock file or folders it made
            raise

    def _undo_lock(self) -> None:
        if self._made_lock:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        for d in self._made_dirs:  # deepest first; only while still empty
            try:
                d.rmdir()
            except OSError:
                break
        self._made_dirs, self._made_lock = [], False

    def _begin_locked(self, fingerprint, resume, overwrite, first_stage) -> dict:
        remove_temporaries(self.path)  # we hold the lock: any temporary is a dead writer's
        state_file = self.path / STATE_NAME
        if state_file.exists():
            if overwrite:
                self.wipe()
            elif not resume:
                raise InputError(
                    f"job directory {self.path} already holds an unfinished or finished job. "
                    f"Pass --resume to continue it, or --overwrite to delete it and start over")
            else:
                state = self.load_state()
                diffs = fingerprint_differences(state["fingerprint"], fingerprint)
                if diffs:
                    raise InputError(
                        f"cannot resume the job in {self.path}: it was started with different "
                        f"inputs ({'; '.join(diffs)}); rerun with the original model, "
                        f"calibration and settings, or pass --overwrite to start over")
                self.state = state
                self.verify()
                return state
        elif self.is_ours():
            # Ours (marker, or only our own stamped files) but state.json is gone: its layers
            # cannot be matched to this run. --overwrite clears it; nothing else touches it.
            if not overwrite:
                raise InputError(
                    f"job directory {self.path} is layerquant's but its {STATE_NAME} is lost, "
                    f"so its finished layers cannot be resumed; pass --overwrite to delete it "
                    f"and start over")
            self.wipe()
        else:
            strangers = [p.name for p in self.path.iterdir() if p.name != LOCK_NAME]
            if strangers:
                raise InputError(
                    f"{self.path} is not empty and holds no {STATE_NAME}, so it is not a "
                    f"layerquant job directory (found {sorted(strangers)[:5]}); refusing to "
                    f"use or delete it: choose a new or empty work directory")
        now = _now()
        self.state = {
            "schema_version": SCHEMA_VERSION, "stage": first_stage,
            "last_finished": {s: -1 for s in WORK_STAGES},
            "layer_files": {s: False for s in WORK_STAGES}, "hidden": None,
            "fingerprint": json.loads(json.dumps(dict(fingerprint), default=str)),
            "notes": {}, "created": now, "updated": now,
        }
        write_marker(self.path, JOB)
        self._write_state()
        self.fresh = True
        return self.state

    def is_ours(self) -> bool:
        """A job directory layerquant wrote: its marker, or (from before markers) nothing but
        our own entries with at least one layer or hidden-state file stamped by a job."""
        marker = read_marker(self.path)
        if marker is not None:
            return marker.get("kind") == JOB
        names = {p.name for p in self.path.iterdir()}
        if not names <= OWN_ENTRIES:
            return False
        files = [p for d in (LAYERS_DIR, HIDDEN_DIR)
                 for p in list_files(self.path / d, "*.safetensors")]
        return bool(files) and all(_stamped(p) for p in files)

    def wipe(self) -> None:
        """Delete the job's own entries (never the lock we hold); anything else in the
        directory is someone else's: refuse, deleting nothing."""
        strangers = sorted(p.name for p in self.path.iterdir() if p.name not in OWN_ENTRIES)
        if strangers:
            raise InputError(f"job directory {self.path} also holds files layerquant did not "
                             f"write ({', '.join(strangers[:5])}); refusing to delete it: move "
                             f"them out or choose another --work-dir")
        for p in self.path.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def peek(self) -> dict | None:
        """The state of a job here without locking or changing anything; None when there is
        no readable state.json (begin() then says why, if it matters)."""
        try:
            return self.load_state() if (self.path / STATE_NAME).is_file() else None
        except InputError:
            return None

    # ---- state.json ----------------------------------------------------------------------
    def load_state(self) -> dict:
        """Read and validate state.json; anything wrong → InputError naming the file."""
        f = self.path / STATE_NAME
        st = read_json(f, "job state")

        def bad(why: str) -> InputError:
            return InputError(f"job state {f} is invalid: {why}; pass --overwrite to start over")

        if not isinstance(st, dict):
            raise bad("top level is not an object")
        version = st.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"job state {f} has schema version {version!r}, this layerquant "
                             f"reads version {SCHEMA_VERSION}; pass --overwrite to start over")
        if st.get("stage") not in STAGES:
            raise bad(f"stage {st.get('stage')!r} is not one of {STAGES}")
        for key in ("last_finished", "layer_files"):
            if not isinstance(st.get(key), dict) or set(st[key]) != set(WORK_STAGES):
                raise bad(f"'{key}' must map each of {WORK_STAGES}")
        for s, i in st["last_finished"].items():
            if not isinstance(i, int) or isinstance(i, bool) or i < -1:
                raise bad(f"last_finished.{s} = {i!r} is not a layer index")
            if not isinstance(st["layer_files"][s], bool):
                raise bad(f"layer_files.{s} = {st['layer_files'][s]!r} is not true/false")
        fp = st.get("fingerprint")
        if not isinstance(fp, dict) or not {"model", "calibration", "settings"} <= set(fp):
            raise bad("'fingerprint' must hold model, calibration and settings")
        h = st.get("hidden")
        if h is not None and not (isinstance(h, dict) and h.get("stage") in WORK_STAGES
                                  and isinstance(h.get("index"), int)):
            raise bad(f"'hidden' = {h!r} is not {{stage, index}}")
        if not isinstance(st.setdefault("notes", {}), dict):
            raise bad("'notes' must be an object")
        return st

    def _write_state(self) -> None:
        self._require_lock()
        self._st()["updated"] = _now()
        atomic_write_json(self.path / STATE_NAME, self.state)

    def verify(self) -> None:
        """Check every file the state says is finished: present, complete, from this job."""
        st = self._st()
        for stage in WORK_STAGES:
            if st["layer_files"][stage]:
                for i in range(st["last_finished"][stage] + 1):
                    self._check_layer_file(stage, i)
        if st["hidden"] is not None:
            self._check_layer_file(st["hidden"]["stage"], st["hidden"]["index"], hidden=True)

    # ---- queries -------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self._st()["stage"]

    def last_finished(self, stage: str) -> int:
        """Index of the last finished layer of `stage`; -1 when none."""
        return self._st()["last_finished"][self._check_stage(stage)]

    def next_layer(self, stage: str) -> int:
        return self.last_finished(stage) + 1

    def _st(self) -> dict:
        if self.state is None:
            raise QuantizerError(f"internal: job {self.path} used before begin()")
        return self.state

    @staticmethod
    def _check_stage(stage: str) -> str:
        if stage not in WORK_STAGES:
            raise ValueError(f"stage must be one of {WORK_STAGES}, got {stage!r}")
        return stage

    def _require_current(self, stage: str) -> str:
        if self._check_stage(stage) != self.stage:
            raise QuantizerError(f"internal: writing {stage} results while job {self.path} is "
                                 f"at stage {self.stage}; call set_stage first")
        return stage

    def set_stage(self, stage: str) -> None:
        """Move to a later stage (or stay); stages never go backwards within a job."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if STAGES.index(stage) < STAGES.index(self.stage):
            raise QuantizerError(f"internal: job {self.path} is at stage {self.stage}, cannot "
                                 f"go back to {stage}")
        if stage != self.stage:
            st = self._st()
            st["stage"] = stage
            if st["hidden"] and st["hidden"]["stage"] != stage:
                st["hidden"] = None
            self._write_state()
            self._prune_hidden(keep=None)  # hidden states belong to one stage's pass

    def finish(self) -> None:
        self.set_stage("done")

    def set_note(self, key: str, value: Any) -> None:
        """Small JSON facts the pipeline wants back on resume (plan choices, chosen bits)."""
        self._st()["notes"][key] = json.loads(json.dumps(value, default=str))
        self._write_state()

    # ---- layers --------------------------------------------------------------------------
    def layer_path(self, stage: str, index: int, hidden: bool = False) -> Path:
        folder = HIDDEN_DIR if hidden else LAYERS_DIR
        return self.path / folder / f"{stage}-{index:05d}.safetensors"

    def _stamp(self, stage: str, index: int, meta: Mapping[str, Any]) -> dict[str, str]:
        info = {"job": fingerprint_digest(self._st()["fingerprint"]), "stage": stage,
                "index": index, "meta": dict(meta)}
        return {_META_KEY: json.dumps(info, sort_keys=True, default=str)}

    def _check_layer_file(self, stage: str, index: int, hidden: bool = False) -> dict:
        p = self.layer_path(stage, index, hidden)
        kind = "hidden-state file" if hidden else "layer file"
        if not p.is_file():
            raise InputError(f"job state {self.path / STATE_NAME} says {kind} {p} was written "
                             f"but it is missing; the job directory is damaged: pass "
                             f"--overwrite to start over")
        raw = read_safetensors_metadata(p, kind).get(_META_KEY)
        try:
            if raw is None:
                raise ValueError("no job stamp")
            info = json.loads(raw)
            ok = (info["job"] == fingerprint_digest(self._st()["fingerprint"])
                  and info["stage"] == stage and info["index"] == index)
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise InputError(f"{kind} {p} does not belong to this job (stage {stage}, layer "
                             f"{index}); the job directory is damaged: pass --overwrite")
        return info

    def save_layer(self, stage: str, index: int, tensors: Mapping[str, torch.Tensor],
                   meta: Mapping[str, Any] | None = None) -> Path:
        """Write a layer's result durably. It counts as finished only after commit_layer."""
        self._require_lock()
        p = self.layer_path(self._require_current(stage), index)
        atomic_save_tensors(p, tensors, self._stamp(stage, index, meta or {}))
        return p

    def layer_meta(self, stage: str, index: int) -> dict:
        """The metadata saved with a finished layer, read from the file's header only."""
        return self._check_layer_file(stage, index)["meta"]

    def load_layer(self, stage: str, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        info = self._check_layer_file(stage, index)
        tensors, _ = load_tensors(self.layer_path(stage, index), "layer file")
        return tensors, info["meta"]

    def commit_layer(self, stage: str, index: int, has_file: bool = True) -> None:
        """Record layer `index` of `stage` as finished (after its files are durable), then drop
        hidden states no longer needed. Layers finish in order: index must be last + 1."""
        self._require_lock()
        self._require_current(stage)
        last = self.last_finished(stage)
        if index != last + 1:
            raise QuantizerError(f"internal: committing layer {index} of {stage} after layer "
                                 f"{last}; layers must finish in order")
        st = self._st()
        if has_file:
            self._check_layer_file(stage, index)
        elif st["layer_files"][stage]:
            raise QuantizerError(f"internal: stage {stage} stores layer files, layer {index} "
                                 f"has none")
        if index == 0:
            st["layer_files"][stage] = has_file
        st["last_finished"][stage] = index
        nxt = self.layer_path(stage, index + 1, hidden=True)
        st["hidden"] = {"stage": stage, "index": index + 1} if nxt.is_file() else None
        self._write_state()
        self._prune_hidden(keep=nxt if nxt.is_file() else None)

    # ---- hidden states -------------------------------------------------------------------
    def save_hidden(self, index: int, tensors: Sequence[torch.Tensor]) -> Path:
        """Hidden states entering layer `index` of the current stage's pass (one tensor per
        calibration chunk). Older ones are deleted once state.json no longer needs them (see
        commit_layer)."""
        self._require_lock()
        stage = self._check_stage(self.stage)
        p = self.layer_path(stage, index, hidden=True)
        chunks = {f"chunk.{i:05d}": t for i, t in enumerate(tensors)}
        atomic_save_tensors(p, chunks, self._stamp(stage, index, {"chunks": len(chunks)}))
        return p

    def has_hidden(self, index: int, stage: str | None = None) -> bool:
        return self.layer_path(stage or self.stage, index, hidden=True).is_file()

    def load_hidden(self, index: int, stage: str | None = None) -> list[torch.Tensor]:
        stage = self._check_stage(stage or self.stage)
        info = self._check_layer_file(stage, index, hidden=True)
        tensors, _ = load_tensors(self.layer_path(stage, index, hidden=True), "hidden-state file")
        n = info["meta"].get("chunks", len(tensors))
        return [tensors[f"chunk.{i:05d}"] for i in range(n)]

    def _prune_hidden(self, keep: Path | None) -> None:
        needed = self._st().get("hidden")
        needed_path = (self.layer_path(needed["stage"], needed["index"], hidden=True)
                       if needed else None)
        for p in list_files(self.path / HIDDEN_DIR, "*.safetensors"):
            if p != keep and p != needed_path:
                p.unlink(missing_ok=True)
