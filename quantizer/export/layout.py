"""The export's file layout, decided before any layer is quantized.

An export is one sequence of tensors -- the checkpoint's non-layer tensors in name order, then
each decoder layer's tensors in name order -- cut into shards of at most `max_shard_bytes` (a
tensor larger than that gets a shard of its own). Each shard is a safetensors file whose header
lists its tensors by descending dtype, then by name, with `{"format": "pt"}` metadata: what
safetensors' `save_file` writes for the same tensors (checked against the installed
safetensors at run time by `convention_holds`, and byte for byte by tests/test_direct_shards.py).

The cut depends only on the tensors' byte sizes in order, and a header only on its shard's
names, dtypes and shapes, all of which are known before any weight is quantized (exporters are
pure tensor -> dict functions, run on meta-device stand-ins). So every byte of every shard has a
known place up front: `quantizer/export/store.py` writes each finished layer there.

`ShardWriter` (writer.py) streams tensors with the same cut, names and index, so both produce
the same files."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from safetensors.torch import save

# safetensors' dtype names
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
# The order of safetensors' Dtype enum: its serializer sorts tensors by it (descending), then
# by name, so the data stays aligned. Names missing from an older safetensors keep their order.
_ST_RANK = {name: i for i, name in enumerate((
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
    "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SHARD_METADATA = {"format": "pt"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor's bytes need in a shard: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        return cls(name, ST_DTYPES[t.dtype], tuple(int(s) for s in t.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM_BYTES[self.dtype]


def starts_new_shard(held_bytes: int, holding: bool, nbytes: int, max_bytes: int) -> bool:
    """The cut: a tensor starts a new shard when the current one holds something and would
    grow past `max_bytes` with it."""
    return holding and held_bytes + nbytes > max_bytes


def shard_file_names(n: int) -> list[str]:
    return ([f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1
            else [SINGLE_NAME])


def index_text(total_bytes: int, weight_map: dict[str, str]) -> str:
    """model.safetensors.index.json for a sharded export (weight_map sorted by name)."""
    return json.dumps({"metadata": {"total_size": total_bytes},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=2)


def _order(specs) -> list[TensorSpec]:
    return sorted(specs, key=lambda s: (-_ST_RANK[s.dtype], s.name))


def safetensors_header(specs, metadata: dict | None = None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the 8-byte length + JSON header + padding, {name: (begin, end) in the data}) of a
    safetensors file holding `specs`, as safetensors' serializer lays it out."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, at = {}, 0
    for s in _order(specs):
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [at, at + s.nbytes]}
        offsets[s.name] = (at, at + s.nbytes)
        at += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


@lru_cache(maxsize=1)
def convention_holds() -> bool:
    """Whether the installed safetensors writes the header `safetensors_header` builds: a
    probe of every dtype an export holds, names that sort differently as text and as numbers,
    serialized by safetensors itself and compared byte for byte."""
    probe = {"model.layers.10.mlp.w": torch.ones(2, 3, dtype=torch.int32),
             "model.layers.2.mlp.w": torch.ones(3, dtype=torch.int32),
             "model.layers.2.a": torch.ones(5, dtype=torch.float16),
             "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
             "lm_head.weight": torch.ones(1, 2, dtype=torch.float32),
             "x.weight_shape": torch.ones(2, dtype=torch.int64),
             "x.codes": torch.ones(3, dtype=torch.uint8), "x.i8": torch.ones(1, dtype=torch.int8),
             "x.empty": torch.ones(0, dtype=torch.float16),
             "x.f64": torch.ones(1, dtype=torch.float64), "x.i16": torch.ones(1, dtype=torch.int16)}
    try:
        theirs = save(probe, metadata=dict(SHARD_METADATA))
    except Exception:  # noqa: BLE001 - any failure means: do not rely on it
        return False
    ours, _ = safetensors_header([TensorSpec.of(k, v) for k, v in probe.items()],
                                 SHARD_METADATA)
    data = b"".join(probe[s.name].contiguous().view(torch.uint8).numpy().tobytes()
                    for s in _order(TensorSpec.of(k, v) for k, v in probe.items()))
    return theirs == ours + data


@dataclass(frozen=True)
class ShardPlan:
    file: str
    header: bytes  # length prefix + JSON + padding: the file's first bytes
    offsets: dict  # tensor name -> (begin, end) within the data

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def size(self) -> int:
        return self.data_start + max((e for _, e in self.offsets.values()), default=0)


@dataclass
class ExportLayout:
    """Every shard's header and every tensor's place, for a head and per-layer tensor specs."""

    head: list[TensorSpec]
    layers: list[list[TensorSpec]]
    max_shard_bytes: int
    shards: list[ShardPlan]
    where: dict[str, int]  # tensor name -> shard index

    @classmethod
    def plan(cls, head: list[TensorSpec], layers: list[list[TensorSpec]],
             max_shard_bytes: int) -> "ExportLayout":
        groups: list[list[TensorSpec]] = []
        held = 0
        for spec in [*sorted(head, key=lambda s: s.name),
                     *(s for layer in layers for s in sorted(layer, key=lambda s: s.name))]:
            if not groups or starts_new_shard(held, bool(groups[-1]), spec.nbytes,
                                              max_shard_bytes):
                groups.append([])
                held = 0
            groups[-1].append(spec)
            held += spec.nbytes
        names = shard_file_names(len(groups))
        shards, where = [], {}
        for k, (file, group) in enumerate(zip(names, groups)):
            header, offsets = safetensors_header(group, SHARD_METADATA)
            shards.append(ShardPlan(file, header, offsets))
            for s in group:
                if s.name in where:
                    raise ValueError(f"tensor {s.name} appears twice in the export")
                where[s.name] = k
        return cls(list(head), [list(l) for l in layers], max_shard_bytes, shards, where)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.head) + sum(s.nbytes for l in self.layers for s in l)

    def weight_map(self) -> dict[str, str]:
        return {name: self.shards[k].file for name, k in sorted(self.where.items())}

    def index_text(self) -> str | None:
        """The index file's text, or None for a single-file export."""
        return index_text(self.total_bytes, self.weight_map()) if len(self.shards) > 1 else None

    def to_json(self) -> dict:
        enc = lambda specs: [[s.name, s.dtype, list(s.shape)] for s in specs]  # noqa: E731
        return {"max_shard_bytes": self.max_shard_bytes, "head": enc(self.head),
                "layers": [enc(l) for l in self.layers], "digest": self.digest()}

    @classmethod
    def from_json(cls, doc: dict) -> "ExportLayout":
        dec = lambda rows: [TensorSpec(n, d, tuple(s)) for n, d, s in rows]  # noqa: E731
        layout = cls.plan(dec(doc["head"]), [dec(l) for l in doc["layers"]],
                          int(doc["max_shard_bytes"]))
        if doc.get("digest") != layout.digest():
            raise ValueError("layout digest does not match its tensors")
        return layout

    def digest(self) -> str:
        h = hashlib.sha256(b"layerquant-export-layout-v1\0")
        for s in self.shards:
            h.update(s.file.encode() + b"\0" + s.header)
        return h.hexdigest()[:32]
