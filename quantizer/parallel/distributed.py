"""Multi-process quantization through torch.distributed: one process per device (NCCL on
GPUs, gloo on CPU), started by torch's own elastic launcher (`quantize --devices 0,1`, what
`torchrun --standalone` uses) or joined under `torchrun` (one host or `--nnodes` hosts).

Rank 0 alone owns the job directory and writes the export; every rank holds its own shards of
the calibration set and takes part in every reduction (quantizer/shards.py says how those stay
bit-identical to a single process)."""
from __future__ import annotations

import os
import uuid
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ..errors import InputError, QuantizerError

@dataclass(frozen=True)
class World:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = World()
_WORLD = [SINGLE]


def world() -> World:
    return _WORLD[0]


def comm_device(w: World) -> torch.device:
    """Where collective buffers live: the rank's GPU under NCCL, host memory under gloo."""
    return w.device if w.device.type == "cuda" else torch.device("cpu")


# ---- launching / joining ------------------------------------------------------------------
def resolve_devices(devices: tuple[str, ...] | None) -> list[str] | None:
    """settings.devices made concrete ("all": every visible GPU), each GPU checked to exist:
    `--devices 0,1` on a machine without them is one line, not a launch whose workers fail
    in CUDA initialisation."""
    if not devices:
        return None
    if tuple(devices) == ("all",):
        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    require_devices(list(devices))
    return list(devices)


def under_launcher() -> bool:
    """True inside a process started by torchrun / the elastic launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and
                                                   "WORLD_SIZE" in os.environ)


def join(devices: list[str] | None = None) -> World:
    """Join the process group of this launch (env:// set by the launcher) and pick this
    rank's device: devices[LOCAL_RANK], or cuda:LOCAL_RANK when devices are not named."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if devices:
        if len(devices) != int(os.environ.get("LOCAL_WORLD_SIZE", len(devices))):
            raise InputError(f"--devices names {len(devices)} devices but this node runs "
                             f"{os.environ.get('LOCAL_WORLD_SIZE')} processes")
        device = torch.device(devices[local])
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and object collectives use the current device
    if not dist.is_initialized():
        # Rank 0 alone assembles the export while the others wait at the final barrier:
        # allow it half an hour before a collective counts as hung.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=30))
    w = World(dist.get_rank(), dist.get_world_size(), device)
    _WORLD[0] = w
    return w


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD[0] = SINGLE


def require_devices(devices: list[str]) -> None:
    """Every named GPU exists: `--devices 0,1` on a machine without them is one line, not a
    launch whose workers fail in CUDA initialisation."""
    gpus = [d for d in devices if d.startswith("cuda")]
    if not gpus:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = max(int(d.split(":")[1]) for d in gpus) + 1
    if visible < wanted:
        have = "no CUDA device is visible" if visible == 0 else \
            f"only {visible} CUDA device(s) are visible (cuda:0..cuda:{visible - 1})"
        raise InputError(f"--devices {','.join(d.split(':')[1] for d in gpus)}: {have}; "
                         f"name visible GPUs, or cpu,cpu for processes on the CPU")


def launch(devices: list[str], fn, *args):
    """Run fn(*args) in one process per device through torch's elastic launcher (what
    `torchrun --standalone` uses: a c10d store on a free local port); each worker joins the
    group first. Returns rank 0's return value. The launcher's log and error files live in a
    temporary folder of ours, removed on every way out (success, failure, Ctrl-C)."""
    require_devices(devices)
    logs = tempfile.mkdtemp(prefix="layerquant-launch-")
    try:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=len(devices),
                              run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=logs))
        try:
            results = elastic_launch(config, _worker)(devices, fn, args)
        except ChildFailedError as e:
            raise QuantizerError(_first_failure(e)) from None
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    first = results[0]
    if isinstance(first, _Refused):  # bad input: the same clean message as one process
        raise first.error_type(first.message)
    return first


def _first_failure(error) -> str:
    """One line for a failed worker: its rank and the first line of what it raised."""
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # the error file's {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    lines = [ln for ln in str(message or "").splitlines() if ln.strip()]
    why = lines[0] if lines else f"exit code {failure.exitcode}"
    return f"worker rank {rank} failed: {why}"


def run_sequence(calls: list) -> list:
    """Several jobs in one launch, [(fn, args), ...] -> their results: what tests and the
    benchmark use to pay the process start-up once."""
    return [fn(*args) for fn, args in calls]


@dataclass(frozen=True)
class _Refused:
    """A worker's refusal (bad input), returned rather than raised so that the launcher can
    raise it as itself instead of a ChildFailedError."""

    error_type: type
    message: str


def _worker(devices, fn, args):
    """A launched process: its exception is written to the launcher's error file (`record`),
    so the parent can say in one line what failed."""
    return record(_join_and_run)(devices, fn, args)


def _join_and_run(devices, fn, args):
    join(devices)
    try:
        return fn(*args)
    except QuantizerError as e:  # refusals happen on every rank alike (same inputs)
        return _Refused(type(e), str(e))
    finally:
        leave()
