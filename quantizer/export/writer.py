"""Assemble the final checkpoint from per-layer files: sharded safetensors + index, config.json
with quantization_config, tokenizer files; staged in a temporary directory and renamed into
place only when complete, so a half-written model never appears under the output name."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..measurements.atomic import fsync_dir
from ..run.outputs import remove_export
from .layout import INDEX_NAME, SHARD_METADATA, index_text, shard_file_names, starts_new_shard

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "added_tokens.json")


class ShardWriter:
    """Streams tensors into shards of at most `max_shard_bytes` (a single larger tensor gets
    its own shard). Only the current shard is ever held in memory."""

    def __init__(self, directory: Path, max_shard_bytes: int = 1 << 30):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if starts_new_shard(self.buffer_bytes, bool(self.buffer), nbytes, self.max):
                self._flush()
            self.buffer[name] = t.contiguous()
            self.buffer_bytes += nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self.buffer:
            return
        index = len(self.shards)
        save_file(self.buffer, str(self.dir / f"shard-{index:05d}.tmp"),
                  metadata=dict(SHARD_METADATA))
        self.shards.append(list(self.buffer))
        for name in self.buffer:
            self.weight_map[name] = index
        self.buffer = {}
        self.buffer_bytes = 0

    def finish(self) -> dict[str, str]:
        """Name the shards model-0000i-of-0000n.safetensors and write the index."""
        self._flush()
        n = len(self.shards)
        names = shard_file_names(n)
        for i, final in enumerate(names):
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
        weight_map = {t: names[i] for t, i in sorted(self.weight_map.items())}
        if n > 1:
            (self.dir / INDEX_NAME).write_text(index_text(self.total_bytes, weight_map))
        return weight_map


def write_config(src_dir: Path, dst_dir: Path, updates: dict) -> dict:
    config = json.loads((Path(src_dir) / "config.json").read_text())
    config.update(updates)
    (Path(dst_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


def publish(staged: Path, output: Path) -> None:
    """Move a complete staged directory to its final name (atomic on one filesystem)."""
    for f in staged.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(staged)
    remove_export(output)  # only our own export, never files layerquant did not write
    os.replace(staged, output)
    fsync_dir(output.parent)
