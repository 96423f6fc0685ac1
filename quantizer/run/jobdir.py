"""The job directory of a run (measurements/jobstate.py holds its format): whether a run may
publish at its output, beginning or resuming it (rank 0 alone owns it; other ranks read it),
and removing one that bad input refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from ..errors import InputError
from ..measurements.jobstate import JobDir
from ..parallel.distributed import World, comm_device
from .outputs import RefusedLate, check_output_dir


def check_output(output: Path, work: Path, overwrite: bool, resume: bool) -> None:
    """May this run publish at `output`? (outputs.check_output_dir; a resumed job may replace
    our old export when it was started with --overwrite, or is complete.)"""
    prior = JobDir(work).peek() if resume else None
    check_output_dir(output, overwrite, resume, may_replace=bool(prior and (
        prior["stage"] in ("export", "done") or bool(prior["notes"].get("replaces_output")))))


def begin_job(w: World, jobdir: JobDir, fingerprint, **kwargs) -> JobDir | FollowerJob:
    """Rank 0 begins (locks, creates or resumes) the job directory; once it has, the other
    ranks open a read-only view of it. A refusal on rank 0 is raised on every rank."""
    if not w.distributed:
        jobdir.begin(fingerprint, **kwargs)
        return jobdir
    box: list[str | None] = [None]
    if w.main:
        try:
            jobdir.begin(fingerprint, **kwargs)
        except InputError as e:
            box = [str(e)]
            dist.broadcast_object_list(box, src=0, device=comm_device(w))
            raise
    dist.broadcast_object_list(box, src=0, device=comm_device(w))
    if box[0] is not None:
        raise InputError(box[0])
    return jobdir if w.main else FollowerJob(jobdir.path)


class FollowerJob:
    """The job directory as ranks > 0 see it: they read what rank 0 wrote, write nothing."""

    def __init__(self, path):
        self._job = JobDir(path)
        self._job.state = self._job.load_state()

    def __getattr__(self, name):
        return getattr(self._job, name)

    def save_layer(self, *args, **kwargs) -> None:
        pass

    def save_hidden(self, *args, **kwargs) -> None:
        pass

    def commit_layer(self, *args, **kwargs) -> None:
        pass

    def set_stage(self, stage: str) -> None:
        state = self._job.state
        assert state is not None  # loaded in __init__
        state["stage"] = stage  # keep the same view of the stage as rank 0

    def finish(self) -> None:
        pass

    def unlock(self) -> None:
        pass


def discard_refused_job(jobdir, created: bool, error: InputError) -> None:
    """Bad input (NaN weights, a shape config.json disagrees with) cannot be fixed by resuming:
    a job this run started is removed, so that fixing the input and rerunning just works. A
    resumed job is kept, and so is one refused late (RefusedLate: its work is reusable)."""
    if isinstance(error, RefusedLate) or not getattr(jobdir, "fresh", False):
        return
    if created:
        shutil.rmtree(jobdir.path, ignore_errors=True)
    else:  # the folder was there (empty, or a job --overwrite cleared): empty it again
        jobdir.wipe()
        jobdir.unlock()
        (jobdir.path / "lock").unlink(missing_ok=True)
