"""A checkpoint on disk: config.json + safetensors shards, read one tensor group at a time.

Nothing here ever holds more than the tensors asked for: shards are opened with safetensors'
mmap reader per request and closed again, so the process's resident memory stays bounded by
the request, not by the model.

With `originals=True` (the quantize pipeline) a checkpoint published already quantized (FP8,
compressed-tensors INT/FP8, MXFP4: quantizer/originals.py) is seen through its logical
tensors: names, shapes and `load()` are those of the float model it stands for, and
`load_stored()` returns the stored parts of each quantized tensor (a `StoredWeight`, 1 byte
or less per weight in host memory) for the device to dequantize just before use."""
from __future__ import annotations

import functools
import json
import math
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import ModelArch, model_arch
from ..arch.family import refuse_stated
from ..errors import InputError
from ..measurements.atomic import safetensors_header
from .inputs import check_config
from .originals import StoredWeight, original_format, packed_bits

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model directory (or that file itself), reading nothing else; one
    clear InputError when it is missing, not JSON or not a JSON object."""
    p = Path(path)
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file():
        raise InputError(f"no config.json at {p}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg_file}: expected a JSON object")
    return config


class CheckpointSource:
    def __init__(self, path: str | os.PathLike, originals: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"model path does not exist: {self.path}")
        if not self.path.is_dir():
            raise InputError(f"model path is not a directory: {self.path}")
        cfg_file = self.path / "config.json"
        self.raw_config = read_config(self.path)
        model_type = self.raw_config.get("model_type")
        if not model_type:
            raise InputError(f"{cfg_file} has no model_type")
        refuse_stated(model_type)  # a refused family as itself, before its numbers are read
        check_config(self.raw_config, cfg_file)  # numbers every stage reads: one line if bad
        self.weight_map = self._read_weight_map()
        self._shapes: dict[str, tuple[list[int], str]] = {}
        for shard in sorted(set(self.weight_map.values())):
            self._shapes.update(read_header(self.path / shard))
        missing = [n for n in self.weight_map if n not in self._shapes]
        if missing:
            raise InputError(f"index lists tensors missing from their shards: {missing[:3]}")
        # Quantized originals: logical (float) names over the stored tensors.
        self.original = None
        self._logical: dict = {}
        self._stored_map = self.weight_map
        if originals:
            self.original = original_format(self.raw_config, {
                n: self._shapes[n] for n in self.weight_map})
        if self.original is not None:
            self._logical = self.original.logical({n: self._shapes[n] for n in self.weight_map})
            self.weight_map = {name: self._stored_map[lg.parts["weight"]]
                               for name, lg in self._logical.items()}

    # ---- index -------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise InputError(f"{index}: not a safetensors index ({e})") from None
            for shard in set(weight_map.values()):
                if not (self.path / shard).is_file():
                    raise InputError(f"{index} names a missing shard: {shard}")
            return weight_map
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in read_header(single)}
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise InputError(f"no safetensors weights in {self.path}")
        return {name: s.name for s in shards for name in read_header(s)}

    # ---- structure ---------------------------------------------------------------------
    @functools.cached_property
    def arch(self) -> ModelArch:
        """The model's structure, discovered from transformers' own modules; InputError (one
        line saying what is missing) for a model that cannot be quantized."""
        return model_arch(self.raw_config, self.weight_map)

    @functools.cached_property
    def _layer_names(self) -> tuple[dict[int, list[str]], list[str]]:
        """Tensor names per decoder layer, and the rest, by the module each one loads into."""
        prefix = self.arch.mem_layers + "."
        by_layer: dict[int, list[str]] = {}
        rest = []
        for name in self.weight_map:
            mem = self.arch.names.disk_to_memory.get(name, name)
            head, _, _ = mem[len(prefix):].partition(".") if mem.startswith(prefix) else ("", "",
                                                                                      "")
            if head.isdigit():
                by_layer.setdefault(int(head), []).append(name)
            else:
                rest.append(name)
        return by_layer, rest

    # ---- queries -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> list[int]:
        lg = self._logical.get(name)
        if lg is None:
            return self._shapes[name][0]
        if lg.shape is None:  # pack-quantized: the shape is a tensor's value
            value = self._read_stored([lg.parts["shape"]])[lg.parts["shape"]]
            shape = [int(v) for v in value.reshape(-1).tolist()]
            packed_bits(lg, shape, self._shapes[lg.parts["weight"]][0])
            lg = self._logical[name] = replace(lg, shape=tuple(shape))
        return list(lg.shape)

    def quantized_names(self) -> list[str]:
        """Logical tensors stored quantized (empty for a float checkpoint)."""
        return [n for n, lg in self._logical.items() if lg.decoder != "plain"]

    def stored_bytes(self, names) -> int:
        """Bytes `load_stored(names)` holds in host memory (the stored form)."""
        if not self._logical:
            return self.nbytes(names)
        return sum(self._logical[n].stored_bytes for n in names)

    def layer_names(self, index: int) -> list[str]:
        return list(self._layer_names[0].get(index, []))

    def non_layer_names(self) -> list[str]:
        return list(self._layer_names[1])

    def nbytes(self, names=None) -> int:
        names = self.weight_map if names is None else names
        total = 0
        for n in names:
            if n in self._logical and self._logical[n].decoder != "plain":
                assert self.original is not None  # packed tensors: a quantized original
                total += math.prod(self.shape(n)) * self.original.dtype.itemsize
                continue
            shape, dtype = self._shapes[n]
            total += math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
        return total

    def total_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in set(self._stored_map.values()))

    # ---- loading -----------------------------------------------------------------------
    def load(self, names, device="cpu", dtype: torch.dtype | None = None,
             check_finite: bool = True) -> dict[str, torch.Tensor]:
        """Read the named tensors (shard by shard, each shard mapped only while read);
        quantized originals come back dequantized on `device` (in `dtype`, else the dtype
        the checkpoint stands for)."""
        if not self._logical:
            return self._read(names, device, dtype, check_finite)
        out = self.load_stored(names, dtype=dtype, check_finite=check_finite)
        for name, value in out.items():
            if isinstance(value, StoredWeight):
                assert self.original is not None  # packed tensors: a quantized original
                out[name] = value.dequantize(device, dtype or self.original.dtype)
            else:
                out[name] = value.to(device)
        return out

    def load_stored(self, names, dtype: torch.dtype | None = None,
                    check_finite: bool = True) -> dict:
        """The named tensors in host memory as stored: plain tensors as `load` gives them,
        a quantized original's as a StoredWeight (its parts), dequantized later on the
        device that uses it (skeleton.load_layer)."""
        if not self._logical:
            return self._read(names, "cpu", dtype, check_finite)
        for n in names:
            if n not in self._logical:
                raise InputError(f"tensor {n} not found in {self.path}")
        plain = [n for n in names if self._logical[n].decoder == "plain"]
        packed = [self._logical[n] for n in names if self._logical[n].decoder != "plain"]
        out: dict[str, torch.Tensor | StoredWeight] = dict(
            self._read(plain, "cpu", dtype, check_finite))
        raw = self._read_stored([p for lg in packed for p in lg.parts.values()])
        original = self.original
        assert original is not None or not packed  # packed tensors: a quantized original
        for lg in packed:
            assert original is not None
            out[lg.name] = StoredWeight(lg, original,
                                        {role: raw[p] for role, p in lg.parts.items()})
        return {n: out[n] for n in names}

    def _read_stored(self, stored_names) -> dict[str, torch.Tensor]:
        """Stored tensors by their on-disk names, as they are (no checks, no casts)."""
        return self._read(stored_names, "cpu", None, False, self._stored_map)

    def _read(self, names, device, dtype, check_finite, weight_map=None
              ) -> dict[str, torch.Tensor]:
        weight_map = self.weight_map if weight_map is None else weight_map
        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            if n not in weight_map:
                raise InputError(f"tensor {n} not found in {self.path}")
            by_shard[weight_map[n]].append(n)
        out = {}
        for shard, shard_names in by_shard.items():
            try:
                with safe_open(self.path / shard, framework="pt", device="cpu") as f:
                    for n in shard_names:
                        t = f.get_tensor(n)
                        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
                            raise InputError(f"tensor {n} in {shard} contains NaN or inf")
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        out[n] = t.to(device)
            except InputError:
                raise
            except Exception as e:  # safetensors raises its own error types for bad files
                raise InputError(f"cannot read {self.path / shard}: {e}") from None
        return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """Parse a safetensors header without mapping the data; a clear error if it is corrupt."""
    try:
        header = safetensors_header(path)[1]
        return {name: (list(meta["shape"]), meta["dtype"]) for name, meta in header.items()
                if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt safetensors file {path}: {e}") from None
