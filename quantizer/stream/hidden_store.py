"""Where the calibration hidden states wait between layers: a list of chunks (samples, seq,
hidden) on the GPU, in host RAM, or on disk (one raw file per chunk in the job directory,
memory-mapped afresh each time a chunk is used and unmapped when the user lets it go, so the
page cache holds them, not the process: a pass over every chunk keeps one resident), as the
memory plan says.

Chunks only ever get smaller during a run (OOM recovery halves them): `rechunk` splits the
stored tensors into views, it never concatenates or copies."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, overload

import torch

PLACES = ("gpu", "cpu", "disk")


def host_copy(x: torch.Tensor, pinned: bool, non_blocking: bool = False) -> torch.Tensor:
    """A host copy of `x`. Pinned (for GPU runs): the copy runs at PCIe speed both ways, and
    torch's host allocator caches pinned blocks, so a layer reuses the previous layer's pages
    (a pageable copy plus pin_memory() costs two host copies and fresh page faults each
    time). non_blocking: the device-to-host copy is only ordered on x's stream, so the host
    may read the result only after a sync -- fine for data that goes back to the GPU on that
    stream. Pageable where pinning is refused."""
    if x.device.type == "cpu" and (not pinned or x.is_pinned()):
        return x
    if pinned:
        try:
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        except RuntimeError:
            return x.to("cpu")
        return out.copy_(x, non_blocking=non_blocking and x.is_cuda)
    return x.to("cpu")


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


class Singles(Sequence[tuple[torch.Tensor]]):
    """(chunk,) for each chunk of `chunks`, fetched only when asked: to_device_ahead over a
    DiskChunks then maps one chunk (two with the copy ahead) at a time."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    @overload
    def __getitem__(self, k: int) -> tuple[torch.Tensor]: ...

    @overload
    def __getitem__(self, k: slice) -> list[tuple[torch.Tensor]]: ...

    def __getitem__(self, k: int | slice) -> tuple[torch.Tensor] | list[tuple[torch.Tensor]]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not 0 <= k < len(self.chunks):
            raise IndexError(k)
        return (self.chunks[k],)


def to_device_ahead(items: Sequence[Sequence[torch.Tensor]], device: torch.device,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each item's tensors on `device` (floating ones in `dtype` if given), in order, with the
    next item's host-to-device copies already running on a side stream while the caller
    computes on this one: a pass over host-resident chunks then costs max(copy, compute),
    not their sum. Two items are on the device at a time (the planner counts them).

    Each copy first waits for the work queued so far: a host chunk may still be arriving
    from an asynchronous device-to-host copy (methods/awq.py stores that way)."""
    device = torch.device(device)

    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    def load(item):
        return tuple(t.to(device, target(t), non_blocking=True) for t in item)

    if device.type != "cuda" or all(t.device == device for item in items for t in item):
        for item in items:
            yield load(item)
        return
    compute = torch.cuda.current_stream(device)
    side = _COPY_STREAMS.get(device)
    if side is None:
        side = _COPY_STREAMS[device] = torch.cuda.Stream(device)

    def issue(item):
        # Allocated from the compute stream's pool (a block freed there is reused at once, so
        # reserved memory follows allocated; side-stream blocks would pile up until the
        # budget's cap); the copy waits for the compute work queued so far, which may still
        # read a reused block.
        out = tuple(t.to(target(t)) if t.device == device else
                    torch.empty(t.shape, dtype=target(t), device=device) for t in item)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            for src, dst in zip(item, out):
                if src.device != device:
                    dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    nxt = issue(items[0]) if len(items) else None
    try:
        for k in range(len(items)):
            assert nxt is not None  # issued for every k < len(items)
            out, done = nxt
            compute.wait_event(done)
            nxt = None
            nxt = issue(items[k + 1]) if k + 1 < len(items) else None
            yield out
    finally:
        if nxt is not None:  # abandoned early: its copy must land before its memory is reused
            compute.wait_event(nxt[1])


class Chunks(list):
    """A list of hidden-state chunks that knows where it lives and which files back it."""

    def __init__(self, items=(), where: str = "cpu", files=()):
        super().__init__(items)
        self.where = where
        self.files: list[Path] = list(files)


@dataclass(frozen=True)
class _OnDisk:
    """Rows r0..r1 of a chunk stored raw in `path` (shape, dtype of the whole chunk)."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    r0: int
    r1: int

    def map(self) -> torch.Tensor:
        numel = 1
        for n in self.shape:
            numel *= n
        whole = torch.from_file(str(self.path), shared=False, size=numel,
                                dtype=self.dtype).view(self.shape)
        return whole[self.r0:self.r1]


class DiskChunks(Chunks):
    """Chunks on disk: each access maps the chunk's file anew (torch.from_file, private and
    read-only in effect), so its pages count towards this process only while the caller
    holds the tensor; a list of tensors would keep every page it ever touched resident."""

    def __init__(self, items=(), files=()):
        super().__init__(items, "disk", files)

    def __getitem__(self, k):
        entry = super().__getitem__(k)
        if isinstance(k, slice):
            return [e.map() if e is not None else None for e in entry]
        return entry.map() if entry is not None else None

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def entries(self) -> list:
        return [super(DiskChunks, self).__getitem__(k) for k in range(len(self))]


class HiddenStore:
    def __init__(self, device: torch.device, folder: Path):
        self.device = torch.device(device)  # the compute device ("gpu" placement)
        self.folder = Path(folder)
        self._names = itertools.count()

    def new(self, where: str) -> Chunks:
        if where not in PLACES:
            raise ValueError(f"hidden states go to one of {PLACES}, not {where!r}")
        return DiskChunks() if where == "disk" else Chunks(where=where)

    def append(self, chunks: Chunks, x: torch.Tensor) -> None:
        """Store one more chunk in `chunks`, at its place."""
        if chunks.where == "gpu":
            chunks.append(x.to(self.device))
            return
        if chunks.where == "cpu":
            chunks.append(self._host(x))
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"h{next(self._names):07d}.bin"
        x = x.detach().to("cpu").contiguous()
        # Raw bytes: bfloat16 has no numpy dtype, so the file is written as uint8.
        x.view(torch.uint8).numpy().tofile(path)
        chunks.files.append(path)
        entry = _OnDisk(path, tuple(x.shape), x.dtype, 0, x.shape[0])
        if isinstance(chunks, DiskChunks):
            list.append(chunks, entry)
        else:  # a plain Chunks marked "disk" (older callers): mapped once, kept mapped
            chunks.append(entry.map())

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        # every calibration pass streams each chunk back to the GPU
        return host_copy(x, pinned=self.device.type == "cuda")

    def move(self, chunks, where: str) -> Chunks:
        """`chunks` (a Chunks or a plain list) at `where`; the same object if already there."""
        if isinstance(chunks, Chunks) and chunks.where == where:
            return chunks
        out = self.new(where)
        for x in chunks:
            self.append(out, x)
        self.release(chunks)
        return out

    @staticmethod
    def release(chunks) -> None:
        """Delete the files behind `chunks` (a mapping still alive reads the unlinked file
        until it goes); the list itself is emptied."""
        for path in getattr(chunks, "files", ()):
            path.unlink(missing_ok=True)
        if isinstance(chunks, Chunks):
            chunks.files.clear()
        chunks.clear()

    @staticmethod
    def rechunk(chunks: Chunks, size: int) -> Chunks:
        """Chunks of at most `size` samples: views of the stored ones, same files."""
        if isinstance(chunks, DiskChunks):
            entries = chunks.entries()
            if all(e.r1 - e.r0 <= size for e in entries):
                return chunks
            out: Chunks = DiskChunks([_OnDisk(e.path, e.shape, e.dtype, a, min(a + size, e.r1))
                              for e in entries for a in range(e.r0, e.r1, size)],
                             chunks.files)
            chunks.files = []
            list.clear(chunks)
            return out
        if all(x.shape[0] <= size for x in chunks):
            return chunks
        parts = [p for x in chunks for p in torch.split(x, size, dim=0)]
        out = Chunks(parts, chunks.where, chunks.files)
        chunks.files = []
        chunks.clear()
        return out
