"""measurement.json: for every layer and module group, the measured candidates (quantization
settings) with their exact storage cost and their relative output error. Written atomically
after every layer, so a killed measurement pass resumes at the next layer, and reusable for
any bits-per-weight target (the optimiser reads it; nothing is measured twice).

    {"schema_version": 1, "kind": "layerquant-measurement", "fingerprint": {...},
     "layers": [{"index": 0, "groups": {"self_attn.qkv": {
         "numel": 25165824, "modules": ["self_attn.q_proj", ...], "block": "self_attn",
         "candidates": [{"label": "4b g128", "bits": 4, "group_size": 128,
                         "bpw": 4.156, "err": 0.0123, "block_err": 0.0071}, ...]}},
       "blocks": {"self_attn": {"output_sq": 0.61, "residual_sq": 9.8,
                                "token_share": 0.05}, ...}}, ...]}

"block_err" (optional): the relative error of the group's block output with this candidate
(quantizer/methods/block_error.py); the optimiser compares it instead of "err" where present.
"blocks" (optional) holds each block's output energy and the residual stream's just after it,
and the per-token mean of their ratio (quantizer/methods/residual_share.py): with
--error-weights residual the optimiser weighs a group's error by that share.

A candidate may describe a per-part mixture with "parts": [{"bits", "group_size",
"fraction"}, ...] (then "bits" is the weighted mean width); any other keys a method needs to
reproduce the candidate are kept as they are. `numel` lives on the group (all its candidates
quantize the same weights)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import InputError
from ..run.outputs import MEASUREMENT_KIND
from .atomic import atomic_write_json, read_json
from .fingerprint import fingerprint_differences, normalise_settings
from .optimizer import Candidate, Choice, Group

SCHEMA_VERSION = 1
KIND = MEASUREMENT_KIND


class MeasurementStore:
    def __init__(self, path: str | os.PathLike, fingerprint: Mapping[str, Any],
                 layers: list[dict] | None = None):
        self.path = Path(path)
        self.fingerprint = normalise_settings(fingerprint)
        self.layers: list[dict] = layers or []

    # ---- create / load -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> "MeasurementStore":
        store = cls(path, fingerprint)
        store.save()
        return store

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeasurementStore":
        """Read and validate; anything wrong → InputError naming the file (and line)."""
        path = Path(path)
        doc = read_json(path, "measurement file")
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise InputError(f"measurement file {path} is not a layerquant measurement "
                             f"(no \"kind\": \"{KIND}\")")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"measurement file {path} has schema version {version!r}, this "
                             f"layerquant reads version {SCHEMA_VERSION}; measure again")
        fp = doc.get("fingerprint")
        if not isinstance(fp, dict) or not {"model", "calibration", "settings"} <= set(fp):
            raise InputError(f"measurement file {path}: 'fingerprint' must hold model, "
                             f"calibration and settings")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InputError(f"measurement file {path}: 'layers' must be a list")
        for pos, layer in enumerate(layers):
            _validate_layer(path, pos, layer)
        return cls(path, fp, layers)

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> "MeasurementStore":
        """Continue the measurement in `path` if it exists (same fingerprint required), else
        start one. Whether continuing is allowed at all is the job's decision (--resume)."""
        if Path(path).exists():
            store = cls.load(path)
            store.check_fingerprint(fingerprint)
            return store
        return cls.create(path, fingerprint)

    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """InputError listing what differs between this measurement's inputs and `fingerprint`."""
        diffs = fingerprint_differences(self.fingerprint, fingerprint)
        if diffs:
            raise InputError(f"measurement file {self.path} was made from different inputs "
                             f"({'; '.join(diffs)}): measure again, or point --measurement at "
                             f"a file made for this model, calibration and settings")

    def save(self) -> None:
        doc = {"schema_version": SCHEMA_VERSION, "kind": KIND, "fingerprint": self.fingerprint,
               "layers": self.layers}
        atomic_write_json(self.path, doc, sort_keys=False)

    # ---- recording -----------------------------------------------------------------------
    def record_layer(self, index: int, groups: Mapping[str, Mapping[str, Any]],
                     blocks: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Store one layer's measurements (and its blocks' residual statistics, if measured)
        and write the file (atomically). Layers arrive in order; recording the last layer
        again (a redo after a kill) replaces it."""
        if not 0 <= index <= len(self.layers):
            raise ValueError(f"layer {index} recorded after {len(self.layers)} layers")
        layer = {"index": index, "groups": {name: dict(g) for name, g in groups.items()}}
        if blocks:
            layer["blocks"] = {name: dict(b) for name, b in blocks.items()}
        layer = json.loads(json.dumps(layer, default=str))  # as it will read back; keeps order
        _validate_layer(self.path, index, layer)
        if index == len(self.layers):
            self.layers.append(layer)
        else:
            self.layers[index] = layer
            del self.layers[index + 1:]  # later layers were measured on different inputs
        self.save()

    def layers_done(self) -> int:
        """Number of layers measured (they are always 0 .. n-1)."""
        return len(self.layers)

    def check_progress(self, finished_layers: int) -> None:
        """The job state says `finished_layers` layers were measured; the file must hold at
        least those (it may hold one more: recorded, then killed before the state update)."""
        if self.layers_done() < finished_layers:
            raise InputError(f"measurement file {self.path} holds {self.layers_done()} layers "
                             f"but the job state says {finished_layers} were measured; the job "
                             f"directory is damaged: pass --overwrite to start over")

    def is_complete(self, num_layers: int) -> bool:
        return len(self.layers) >= num_layers

    # ---- optimiser interface -------------------------------------------------------------
    def _entries(self, allowed: Callable[[dict], bool] | None, allowed_for=None):
        """(layer index, group name, group, candidates the caller allows), in file order.
        `allowed_for(layer index, group name)` gives a per-group filter instead."""
        for layer in self.layers:
            for name, g in layer["groups"].items():
                ok = allowed_for(layer["index"], name) if allowed_for is not None else allowed
                cands = [c for c in g["candidates"] if ok is None or ok(c)]
                if not cands:
                    raise InputError(f"measurement file {self.path}: no usable candidate for "
                                     f"layer {layer['index']} group {name}")
                yield layer["index"], name, g, cands

    @property
    def residual_weighted(self) -> bool:
        """Whether every layer recorded its blocks' residual shares (files measured before
        they were recorded have none: their groups then all weigh 1)."""
        return bool(self.layers) and all(
            share((layer.get("blocks") or {}).get(g.get("block"))) is not None
            for layer in self.layers for g in layer["groups"].values())

    @property
    def has_block_errors(self) -> bool:
        """Whether q/k/v and gate/up were judged on their block's output (files measured
        before that compare every group's own output error)."""
        return any("block_err" in c for layer in self.layers for g in layer["groups"].values()
                   for c in g["candidates"])

    def residual_weight(self, index: int, name: str) -> float:
        layer = self.layers[index]
        return share((layer.get("blocks") or {}).get(layer["groups"][name].get("block"))) or 1.0

    def groups(self, weight: Callable[[int, str], float] | None = None,
               allowed: Callable[[dict], bool] | None = None, allowed_for=None
               ) -> list[Group]:
        """Every (layer, group) as an optimiser Group named "<layer>.<group>", in file order,
        each candidate's cost its squared relative output error.
        `weight(layer_index, group_name)` gives its importance (default 1; `residual_weight`:
        its block's residual share); `allowed(candidate)` drops candidates the export cannot
        use (pass the same to `selection`)."""
        out = []
        for index, name, g, cands in self._entries(allowed, allowed_for):
            w = 1.0 if weight is None else float(weight(index, name))
            # The optimiser adds up squared relative errors: a model's loss grows about
            # quadratically in small output perturbations, so a plain sum overvalues shaving
            # already-small errors (on stories260K at the uniform GPTQ cost, the plain sum's
            # choice lost to uniform GPTQ in perplexity; the squared sum's beat it in ppl and KL).
            # The error compared is the block output's where measured (q/k/v, gate/up):
            # a group's own output error is not what the residual stream sees.
            out.append(Group(g["numel"], [Candidate(c["bpw"], c.get("block_err", c["err"]) ** 2,
                                                    c["label"]) for c in cands],
                             w, f"{index}.{name}"))
        return out

    def selection(self, choice: Choice, allowed: Callable[[dict], bool] | None = None,
                  allowed_for=None) -> dict[int, dict[str, dict]]:
        """The chosen candidate dict per layer and group, for the quantization pass."""
        out: dict[int, dict[str, dict]] = {}
        entries = list(self._entries(allowed, allowed_for))
        if len(entries) != len(choice.indices):
            raise ValueError(f"choice has {len(choice.indices)} groups, the measurement "
                             f"{len(entries)}: was it made from this file and filter?")
        for (index, name, _, cands), i in zip(entries, choice.indices):
            out.setdefault(index, {})[name] = cands[i]
        return out


def share(block: Any) -> float | None:
    """A block's share of the residual stream from its recorded statistics: the per-token
    mean E_t[‖out_t‖² / ‖h_t‖²] where recorded ("token_share"), else E‖out‖² / E‖h after‖²;
    None when unrecorded."""
    if isinstance(block, dict) and _num(block.get("token_share")) and block["token_share"] > 0:
        return float(block["token_share"])
    if not isinstance(block, dict) or not _num(block.get("residual_sq")) \
            or not _num(block.get("output_sq")) or block["residual_sq"] <= 0:
        return None
    return float(block["output_sq"]) / float(block["residual_sq"])


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_layer(path: Path, pos: int, layer: Any) -> None:
    where = f"measurement file {path}, layer entry {pos}"
    if not isinstance(layer, dict) or layer.get("index") != pos:
        raise InputError(f"{where}: expected {{\"index\": {pos}, \"groups\": ...}}")
    blocks = layer.get("blocks", {})
    if not isinstance(blocks, dict) or any(
            not isinstance(b, dict) or not all(_num(b.get(k)) and b[k] >= 0
                                               for k in ("output_sq", "residual_sq"))
            for b in blocks.values()):
        raise InputError(f"{where}: 'blocks' must map block names to non-negative "
                         f"'output_sq' and 'residual_sq', got {blocks!r}")
    groups = layer.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{where}: 'groups' must be a non-empty object")
    for name, g in groups.items():
        gw = f"{where}, group {name}"
        if not isinstance(g, dict):
            raise InputError(f"{gw}: not an object")
        if not isinstance(g.get("numel"), int) or g["numel"] <= 0:
            raise InputError(f"{gw}: 'numel' must be a positive integer, got {g.get('numel')!r}")
        cands = g.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise InputError(f"{gw}: 'candidates' must be a non-empty list")
        if "block" in g and not isinstance(g["block"], str):
            raise InputError(f"{gw}: 'block' must be a string, got {g['block']!r}")
        for j, c in enumerate(cands):
            if not (isinstance(c, dict) and isinstance(c.get("label"), str)
                    and _num(c.get("bpw")) and c["bpw"] > 0
                    and _num(c.get("err")) and c["err"] >= 0
                    and (_num(c.get("block_err", 0)) and c.get("block_err", 0) >= 0)):
                raise InputError(f"{gw}, candidate {j}: needs a string 'label', a positive "
                                 f"'bpw' and a finite non-negative 'err', got {c!r}")
