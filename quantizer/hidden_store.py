"""Where the calibration hidden states wait between layers: a list of chunks (samples, seq,
hidden) on the GPU, in host RAM, or on disk (one raw file per chunk in the job directory,
memory-mapped back, so the page cache holds them, not the process), as the memory plan says.

Chunks only ever get smaller during a run (OOM recovery halves them): `rechunk` splits the
stored tensors into views, it never concatenates or copies."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

PLACES = ("gpu", "cpu", "disk")


class Chunks(list):
    """A list of hidden-state chunks that knows where it lives and which files back it."""

    def __init__(self, items=(), where: str = "cpu", files=()):
        super().__init__(items)
        self.where = where
        self.files: list[Path] = list(files)


class HiddenStore:
    def __init__(self, device: torch.device, folder: Path):
        self.device = torch.device(device)  # the compute device ("gpu" placement)
        self.folder = Path(folder)
        self._names = itertools.count()

    def new(self, where: str) -> Chunks:
        if where not in PLACES:
            raise ValueError(f"hidden states go to one of {PLACES}, not {where!r}")
        return Chunks(where=where)

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
        chunks.append(torch.from_file(str(path), shared=False, size=x.numel(),
                                      dtype=x.dtype).view(x.shape))

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        """A host copy; pinned on GPU runs (every calibration pass streams each chunk back to
        the GPU: pinned copies run at PCIe speed), pageable where pinning is refused."""
        if self.device.type != "cuda":
            return x.to("cpu")
        try:
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        except RuntimeError:
            return x.to("cpu")
        return out.copy_(x)

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
        if all(x.shape[0] <= size for x in chunks):
            return chunks
        parts = [p for x in chunks for p in torch.split(x, size, dim=0)]
        out = Chunks(parts, chunks.where, chunks.files)
        chunks.files = []
        chunks.clear()
        return out
