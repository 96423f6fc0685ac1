"""Multi-process quantization through torch.distributed: one process per device (NCCL on
GPUs, gloo on CPU), started by torch's own elastic launcher or joined under `torchrun`.

The rule that makes a W-process run bit-identical to a 1-process run: the work is cut into
pieces that are a property of the *run*, never of the world size, and every process computes
its pieces with the same code a single process uses.

* Calibration samples are cut into `calib.shards` contiguous shards (a result setting,
  default 8): shard s holds samples [s*n//S, (s+1)*n//S). Forward chunks never cross a shard,
  and rank r of W owns a contiguous run of shards (`owned_shards`), so its hidden states are
  exactly the single process's chunks of those shards.
* A statistic (GPTQ Hessian, AWQ mean |x|, a grid-search loss, an output error) is built per
  shard and the shard partials are combined by a left fold in shard order:
  ((P0 + P1) + P2) + ... . A single process folds as it goes; W processes pass the running
  fold along the ranks (`fold_chain`, rank r → r+1, the last broadcasts) or, for small
  values, place each partial in a zero buffer and all-reduce its *bit pattern* as integers
  (`assemble`: one contributor per element, so integer addition is exact) and fold locally.
  Either way the additions are the single process's, in its order.
* Module-parallel work is cut into units fixed by the layer (GPTQ: each stacked solve of an
  input group; AWQ: each linear's clip search); unit k runs on rank k % W and its result is
  broadcast, so every rank rebuilds the same layer.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from .errors import InputError

DEFAULT_SHARDS = 8


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
            import torch.distributed as dist
            dist.barrier()


SINGLE = World()
_WORLD = [SINGLE]


def world() -> World:
    return _WORLD[0]


# ---- launching / joining ------------------------------------------------------------------
def parse_devices(text: str | None) -> list[str] | None:
    """`--devices`: "0,1" (CUDA indices), "all" (every visible GPU) or "cpu,cpu" (one CPU
    process per entry). None when not given."""
    if text is None or str(text).strip() == "":
        return None
    if str(text).strip() == "all":
        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "cpu":
            out.append("cpu")
        elif part.isdigit():
            out.append(f"cuda:{part}")
        elif part.startswith("cuda:") and part[5:].isdigit():
            out.append(part)
        else:
            raise InputError(f"--devices: {part!r} is not a GPU index, cuda:N or cpu")
    if len({d for d in out if d != "cpu"}) != len([d for d in out if d != "cpu"]):
        raise InputError(f"--devices {text}: a GPU is named twice (one process per GPU)")
    if any(d.startswith("cuda") for d in out) and "cpu" in out:
        raise InputError(f"--devices {text}: mix of cpu and GPUs (one backend per run)")
    return out


def under_launcher() -> bool:
    """True inside a process started by torchrun / the elastic launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and
                                                   "WORLD_SIZE" in os.environ)


def join(devices: list[str] | None = None) -> World:
    """Join the process group of this launch (env:// set by the launcher) and pick this
    rank's device: devices[LOCAL_RANK], or cuda:LOCAL_RANK when devices are not named."""
    import torch.distributed as dist

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
        # allow it an hour before a collective counts as hung.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(hours=1))
    w = World(dist.get_rank(), dist.get_world_size(), device)
    _WORLD[0] = w
    return w


def leave() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD[0] = SINGLE


def launch(devices: list[str], fn, *args):
    """Run fn(*args) in one process per device through torch's elastic launcher (what
    `torchrun --standalone` uses: a c10d store on a free local port); each worker joins the
    group first. Returns rank 0's return value."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=len(devices),
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    results = elastic_launch(config, _worker)(devices, fn, args)
    return results[0]


def run_sequence(calls: list) -> list:
    """Several jobs in one launch, [(fn, args), ...] -> their results: what tests and the
    benchmark use to pay the process start-up once."""
    return [fn(*args) for fn, args in calls]


def _worker(devices, fn, args):
    join(devices)
    try:
        return fn(*args)
    finally:
        leave()


# ---- calibration shards -------------------------------------------------------------------
def owned_shards(n_shards: int, rank: int, size: int) -> range:
    """Rank r's contiguous run of shards (balanced: sizes differ by at most one)."""
    return range(rank * n_shards // size, (rank + 1) * n_shards // size)


@dataclass
class CalibLayout:
    """Which calibration chunks this rank holds: per local chunk its shard and its sample
    range [start, end); plus the run-wide sample and shard counts."""

    shard_of: list[int]
    sample_start: list[int]
    sample_end: list[int]
    n_samples: int
    n_shards: int
    world: World = SINGLE

    @classmethod
    def plan(cls, n_samples: int, chunk: int, shards: int, w: World = SINGLE) -> "CalibLayout":
        shards = max(1, min(int(shards), n_samples))
        if w.size > shards:
            raise InputError(f"{w.size} processes but the calibration set is cut into "
                             f"{shards} shards: use at most {shards} devices (or raise "
                             f"--calib-shards and the sample count)")
        shard_of, starts, ends = [], [], []
        for s in owned_shards(shards, w.rank, w.size):
            lo, hi = s * n_samples // shards, (s + 1) * n_samples // shards
            for a in range(lo, hi, max(1, chunk)):
                shard_of.append(s)
                starts.append(a)
                ends.append(min(a + max(1, chunk), hi))
        return cls(shard_of, starts, ends, n_samples, shards, w)

    @classmethod
    def single(cls, inputs) -> "CalibLayout":
        """One shard holding every chunk: what a LayerContext built without a layout gets
        (the statistics then fold chunk by chunk, as they always did)."""
        starts, ends, n = [], [], 0
        for x in inputs:
            starts.append(n)
            n += x.shape[0]
            ends.append(n)
        return cls([0] * len(starts), starts, ends, n, 1, SINGLE)


def layout_of(ctx) -> CalibLayout:
    layout = getattr(ctx, "layout", None)
    return layout if layout is not None else CalibLayout.single(ctx.inputs)


# ---- exact reductions -------------------------------------------------------------------
def assemble(buf: torch.Tensor, w: World) -> torch.Tensor:
    """Every rank filled its own elements of `buf` and left the rest zero: all-reduce the bit
    patterns as integers, which is exact (one non-zero contributor per element), so each
    value arrives bit for bit, -0.0 and NaN payloads included."""
    if not w.distributed:
        return buf
    import torch.distributed as dist
    buf = buf.contiguous()
    nbytes = buf.numel() * buf.element_size()
    view = buf.view(-1).view(torch.int32 if nbytes % 4 == 0 else torch.uint8)
    dist.all_reduce(view)
    return buf


def fold_values(layout: CalibLayout, partials: dict[int, float]) -> float:
    """Σ over shards, in shard order, of float64 partials (grid-search losses, errors)."""
    buf = torch.zeros(layout.n_shards, dtype=torch.float64,
                      device=_comm_device(layout.world))
    for s, v in partials.items():
        buf[s] = float(v)
    total = 0.0
    for v in assemble(buf, layout.world).tolist():
        total += v
    return total


def fold_tensors(layout: CalibLayout, partials: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σ over shards, in shard order, of equal-shape tensor partials (small statistics)."""
    ref = next(iter(partials.values())) if partials else None
    shape, dtype, device = _agree_meta(layout.world, ref)
    buf = torch.zeros((layout.n_shards,) + shape, dtype=dtype, device=device)
    for s, t in partials.items():
        buf[s] = t
    buf = assemble(buf, layout.world)
    total = buf[0].clone()
    for s in range(1, layout.n_shards):
        total += buf[s]
    return total


def _agree_meta(w: World, ref):
    meta = [None if ref is None else (tuple(ref.shape), ref.dtype)]
    if w.distributed:
        import torch.distributed as dist
        gathered = [None] * w.size
        dist.all_gather_object(gathered, meta[0])
        meta = [next(m for m in gathered if m is not None)]
    shape, dtype = meta[0]
    return shape, dtype, (ref.device if ref is not None else _comm_device(w))


def _comm_device(w: World) -> torch.device:
    return w.device if w.device.type == "cuda" else torch.device("cpu")


def any_true(layout: CalibLayout, flag: bool) -> bool:
    """True when `flag` holds on any rank (a decision every rank must share)."""
    if not layout.world.distributed:
        return bool(flag)
    import torch.distributed as dist
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(layout.world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class ShardFold:
    """Per-shard accumulators combined by a left fold in shard order.

    `new()` makes an empty accumulator with `.merge(other)` (in place), `.state()` (the
    tensors holding its whole state) and `.load_state(tensors)`. Chunks arrive in shard
    order; the head of the chain (rank 0, or a single process) folds each finished shard at
    once, so it holds two accumulators; a later rank keeps its shards' partials until the
    running fold of the ranks before it arrives (`result`)."""

    def __init__(self, layout: CalibLayout, new):
        self.layout, self.new = layout, new
        self.total = None  # the running fold
        self.parts: list[tuple[int, object]] = []

    def part(self, shard: int):
        if self.parts and self.parts[-1][0] == shard:
            return self.parts[-1][1]
        if self.layout.world.rank == 0 and self.parts:  # head: fold the finished shard now
            self._absorb(self.parts.pop()[1])
        acc = self.new()
        self.parts.append((shard, acc))
        return acc

    def _absorb(self, acc) -> None:
        if self.total is None:
            self.total = acc
        else:
            self.total.merge(acc)

    def result(self):
        w = self.layout.world
        if w.distributed and w.rank > 0:  # the fold of every earlier shard
            self.total = self._transfer(self.new(), "recv", w.rank - 1)
        for _, acc in self.parts:
            self._absorb(acc)
        self.parts = []
        if self.total is None:
            self.total = self.new()
        if w.distributed:
            if w.rank < w.size - 1:
                self._transfer(self.total, "send", w.rank + 1)
            # the last rank holds the fold of all shards
            self.total = self._transfer(self.total, "broadcast", w.size - 1)
        return self.total

    @staticmethod
    def _transfer(acc, op: str, peer: int):
        import torch.distributed as dist
        state = acc.state()
        for t in state:
            if op == "send":
                dist.send(t, dst=peer)
            elif op == "recv":
                dist.recv(t, src=peer)
            else:
                dist.broadcast(t, src=peer)
        acc.load_state(state)
        return acc


# ---- module parallel ----------------------------------------------------------------------
def run_units(layout: CalibLayout, units: list, fn) -> list:
    """fn(unit) for every unit, unit k on rank k % W; every rank gets every result (a
    structure of tensors and plain values, moved to the caller's device)."""
    w = layout.world
    if not w.distributed:
        return [fn(u) for u in units]
    import torch.distributed as dist
    out = []
    for k, unit in enumerate(units):
        owner = k % w.size
        box = [_to(fn(unit), torch.device("cpu")) if w.rank == owner else None]
        dist.broadcast_object_list(box, src=owner, device=_comm_device(w))
        out.append(_to(box[0], w.device))
    return out


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)
                                           if torch.is_tensor(getattr(obj, f.name))})
    return obj


# ---- the job directory --------------------------------------------------------------------
def begin_job(w: World, jobdir, fingerprint, **kwargs):
    """Rank 0 begins (locks, creates or resumes) the job directory; once it has, the other
    ranks open a read-only view of it. A refusal on rank 0 is raised on every rank."""
    if not w.distributed:
        return jobdir, jobdir.begin(fingerprint, **kwargs)
    import torch.distributed as dist
    box, state = [None], None
    if w.main:
        try:
            state = jobdir.begin(fingerprint, **kwargs)
        except InputError as e:
            box = [str(e)]
            dist.broadcast_object_list(box, src=0, device=_comm_device(w))
            raise
    dist.broadcast_object_list(box, src=0, device=_comm_device(w))
    if box[0] is not None:
        raise InputError(box[0])
    if w.main:
        return jobdir, state
    follower = FollowerJob(jobdir.path)
    return follower, follower.state


class FollowerJob:
    """The job directory as ranks > 0 see it: they read what rank 0 wrote, write nothing."""

    def __init__(self, path):
        from .measurements.jobstate import JobDir
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
        self._job.state["stage"] = stage  # keep the same view of the stage as rank 0

    def finish(self) -> None:
        pass

    def unlock(self) -> None:
        pass
