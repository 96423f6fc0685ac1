"""Calibration shards and the reductions over them: how a W-process run stays bit-identical
to a 1-process run.

The rule: the work is cut into
pieces that are a property of the *run*, never of the world size, and every process computes
its pieces with the same code a single process uses.

* Calibration samples are cut into `calib.shards` contiguous shards (a result setting,
  default 8): shard s holds samples [s*n//S, (s+1)*n//S). Forward chunks never cross a shard,
  and rank r of W owns a contiguous run of shards (`owned_shards`), so its hidden states are
  exactly the single process's chunks of those shards.
* A statistic (GPTQ Hessian, AWQ mean |x|, a grid-search loss, an output error) is built per
  shard and the shard partials are combined by a left fold in shard order:
  ((P0 + P1) + P2) + ... . A single process folds as it goes; W processes pass the running
  fold along the ranks (`ShardFold`: rank r → r+1, the last broadcasts) or, for small
  values, place each partial in a zero buffer and all-reduce its *bit pattern* as integers
  (`assemble`: one contributor per element, so integer addition is exact) and fold locally.
  Either way the additions are the single process's, in its order.
* Module-parallel work is cut into units fixed by the layer (GPTQ: each stacked solve of an
  input group; AWQ: each linear's clip search); unit k runs on rank k % W and its result is
  broadcast, so every rank rebuilds the same layer.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from ..errors import InputError
from .distributed import SINGLE, World, comm_device, world


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

    def split(self, size: int) -> "CalibLayout":
        """The layout after every chunk is cut into pieces of at most `size` samples (what
        HiddenStore.rechunk does to the chunks themselves): pieces stay in their shard."""
        shard_of, starts, ends = [], [], []
        for s, a, b in zip(self.shard_of, self.sample_start, self.sample_end):
            for lo in range(a, b, max(1, size)):
                shard_of.append(s)
                starts.append(lo)
                ends.append(min(lo + max(1, size), b))
        return CalibLayout(shard_of, starts, ends, self.n_samples, self.n_shards, self.world)

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
    buf = buf.contiguous()
    nbytes = buf.numel() * buf.element_size()
    view = buf.view(-1).view(torch.int32 if nbytes % 4 == 0 else torch.uint8)
    dist.all_reduce(view)
    return buf


def fold_values(layout: CalibLayout, partials: dict[int, float]) -> float:
    """Σ over shards, in shard order, of float64 partials (grid-search losses, errors)."""
    buf = torch.zeros(layout.n_shards, dtype=torch.float64,
                      device=comm_device(layout.world))
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
    meta: list[tuple[tuple[int, ...], torch.dtype] | None] = [
        None if ref is None else (tuple(ref.shape), ref.dtype)]
    if w.distributed:
        gathered = [None] * w.size
        dist.all_gather_object(gathered, meta[0])
        meta = [next(m for m in gathered if m is not None)]
    agreed = meta[0]
    if agreed is None:
        raise ValueError("no process holds the tensor whose shape the ranks agree on")
    shape, dtype = agreed
    return shape, dtype, (ref.device if ref is not None else comm_device(w))


def any_true(layout: CalibLayout, flag: bool) -> bool:
    """True when `flag` holds on any rank (a decision every rank must share)."""
    if not layout.world.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device(layout.world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agree_min(w: World, value: int) -> int:
    """The smallest of every rank's `value` (e.g. the planner's chunk size, which depends on
    each GPU's free memory): one choice for the whole run."""
    if not w.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device(w))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class ShardFold:
    """Per-shard accumulators combined by a left fold in shard order.

    `new()` makes an empty accumulator with `.merge(other)` (in place), `.state()` (the
    tensors holding its whole state) and `.load_state(tensors)`. Chunks arrive in shard
    order; the head of the chain (rank 0, or a single process) folds each finished shard at
    once, so it holds two accumulators; a later rank keeps its shards' partials until the
    running fold of the ranks before it arrives (`result`)."""

    def __init__(self, layout: CalibLayout, new, host_total: bool = False):
        self.layout, self.new = layout, new
        self.host_total = host_total  # keep the running fold in host RAM (acc.to_host())
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
            if self.host_total:
                acc.to_host()
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

        comm = comm_device(world())
        state = []
        for t in acc.state():
            buf = t if t.device == comm else t.to(comm)  # a host-kept total under NCCL
            if op == "send":
                dist.send(buf, dst=peer)
            elif op == "recv":
                dist.recv(buf, src=peer)
            else:
                dist.broadcast(buf, src=peer)
            if buf is not t:
                t.copy_(buf)
            state.append(t)
        acc.load_state(state)
        return acc


# ---- module parallel ----------------------------------------------------------------------
def run_units(layout: CalibLayout, units: list, fn) -> list:
    """fn(unit) for every unit, unit k on rank k % W; every rank gets every result (a
    structure of tensors and plain values). Each rank first runs all of its units, then the
    results are shared in unit order."""
    w = layout.world
    if not w.distributed:
        return [fn(u) for u in units]
    mine = {k: fn(u) for k, u in enumerate(units) if k % w.size == w.rank}
    return [share(mine.get(k), k % w.size, w) for k in range(len(units))]


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in a shared structure (the tensor travels on its own)."""

    index: int
    shape: tuple
    dtype: torch.dtype


def share(obj, owner: int, w: World):
    """`obj` from rank `owner` on every rank: its structure as a small pickled message, its
    tensors by direct broadcasts on the rank's device (NVLink under NCCL, no pickling of
    weight-sized data). Tensors arrive on each rank's device."""
    tensors: list[torch.Tensor] = []
    box = [_map(obj, lambda t: _slot(t, tensors)) if w.rank == owner else None]
    dist.broadcast_object_list(box, src=owner, device=comm_device(w))
    dev = comm_device(w)

    def fetch(slot: _Slot):
        if w.rank == owner:
            t = tensors[slot.index].to(dev).contiguous()
        else:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=dev)
        wire = t.view(torch.uint8) if t.dtype == torch.bool else t
        dist.broadcast(wire, src=owner)
        return t.to(w.device)

    return _map(box[0], lambda x: fetch(x) if isinstance(x, _Slot) else x, slots=True)


def _slot(t: torch.Tensor, tensors: list) -> _Slot:
    tensors.append(t)
    return _Slot(len(tensors) - 1, tuple(t.shape), t.dtype)


def _map(obj, fn, slots: bool = False):
    """obj with fn applied to every tensor (or, with slots, to every _Slot)."""
    if (isinstance(obj, _Slot) if slots else torch.is_tensor(obj)):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn, slots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn, slots) for v in obj)
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, _Slot):
        return replace(obj, **{f.name: _map(getattr(obj, f.name), fn, slots)
                               for f in fields(obj)})
    return obj
