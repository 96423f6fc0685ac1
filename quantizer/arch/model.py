"""A whole model's quantization structure: its decoder layers grouped into kinds (dense,
sparse, linear attention, ...), each kind's spec discovered from transformers' own layer, the
on-disk names of its tensors, and the modules kept as they are (a vision tower, a projector).

`model_arch(config_dict, disk_names)` is the one entry point; `CheckpointSource.arch` and the
planner's `ModelShapes` both come from it."""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InputError, Unsupported
from . import family as families
from .base import ArchSpec, MoESpec, ScaleGroup
from .discover import InputFound, LayerFound, common_parent, trace_layer
from .experts import UnfusedExperts, unfused
from .folds import norm_fold_kind
from .meta import (build_meta, capture_layer_calls, config_from_dict, decoder_layers,
                   materialise_buffers, text_config, text_module_paths)
from .moe import moe_layer_spec
from .names import NameMap

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DISCOVERY_TOKENS = 8


@dataclass(frozen=True)
class LayerKind:
    """Decoder layers that share one structure."""

    index: int  # the first layer of this kind
    layers: tuple[int, ...]
    found: LayerFound
    spec: ArchSpec  # methods' spec (MoE layers: before expert fallbacks are taken out)
    norm_before_experts: str | None = None  # the producer of the sparse block's input

    @property
    def moe(self) -> MoESpec | None:
        return self.spec.moe

    def __bool__(self) -> bool:  # the planner iterates kinds as "is this kind MoE?"
        return self.spec.moe is not None


@dataclass
class ModelArch:
    """Model-level structure: what CheckpointSource.arch and Job.arch are."""

    name: str  # config model_type
    family: families.Family
    config: Any  # transformers' (top-level) config; its fields differ by family
    text: Any  # its text config
    mem_layers: str  # decoder layers' path in transformers' model ("model.language_model.layers")
    layers_prefix: str  # decoder layers' tensor-name prefix on disk ("model.layers")
    kinds: tuple[LayerKind, ...]
    kind_of: tuple[int, ...]  # layer index -> index into kinds
    renames: dict  # kind index -> {module path in memory: module path on disk} in a layer
    text_modules: tuple[str, ...]  # memory paths of the modules the text forward uses
    kept_modules: tuple[str, ...]  # on-disk module names kept as they are (vision tower, ...)
    names: NameMap = field(repr=False)
    layer_classes: tuple = field(repr=False, default=())  # per kind: the decoder layer class
    fold_checks: dict = field(default_factory=dict, repr=False)

    # ---- what the rest of the package asks -------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kind_of)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def kind(self, index: int) -> LayerKind:
        return self.kinds[self.kind_of[index]]

    def is_moe_layer(self, config, index: int) -> bool:
        return self.kind(index).moe is not None

    @property
    def moe(self) -> MoESpec | None:
        """The sparse block's spec (one per model: every MoE layer kind shares it)."""
        return next((k.moe for k in self.kinds if k.moe is not None), None)

    def representative_layers(self, config=None) -> tuple[int, ...]:
        return tuple(sorted({k.index for k in self.kinds}))

    def for_layer(self, config, index: int, rtn_experts: tuple[int, ...] = ()) -> ArchSpec:
        kind = self.kind(index)
        if kind.moe is None:
            return kind.spec
        return moe_layer_spec(kind.spec, kind.norm_before_experts, tuple(rtn_experts))

    # the dense MLP (padding): from the first dense kind that has one
    @functools.cached_property
    def _mlp(self) -> tuple[tuple[str, ...], str, str]:
        return dense_mlp(self)

    @property
    def mlp_gate_up(self) -> tuple[str, ...]:
        return self._mlp[0]

    @property
    def mlp_down(self) -> str:
        return self._mlp[1]

    @property
    def intermediate_key(self) -> str:
        return self._mlp[2]

    @property
    def not_quantized(self) -> tuple[str, ...]:
        return ("lm_head",) + self.kept_modules + self.family.kept_in_layers

    def not_converted(self, export_format: str) -> list[str]:
        """What the export's quantization_config lists as not quantized. AutoAWQ and GPTQ
        (modules_to_not_convert) match by substring, so "visual" covers visual.* and
        model.visual.* alike; compressed-tensors' ignore matches whole names or "re:"
        patterns (re.match), so a kept module becomes a pattern that holds in either layout."""
        if export_format != "compressed-tensors":
            return list(self.not_quantized)
        kept = [f"re:.*{re.escape(m)}\\..*" for m in self.kept_modules]
        kept += [f"re:.*\\.{re.escape(m)}$" for m in self.family.kept_in_layers]
        return ["lm_head"] + kept

    def split_non_layer(self, disk_names) -> tuple[list[str], list[str]]:
        """(tensors the text model uses, tensors of kept modules) among `disk_names`."""
        text: list[str] = []
        kept: list[str] = []
        for name in disk_names:
            mem = self.names.disk_to_memory.get(name, name)
            (text if any(p == "" or mem.startswith(p + ".") for p in self.text_modules)
             else kept).append(name)
        return text, kept

    def config_update(self, raw: dict, key: str, value) -> dict:
        """config.json entries that set the text model's `key` to `value` (VLMs keep it in
        text_config; Qwen2-VL's original config keeps it at the top)."""
        if key in raw or not isinstance(raw.get("text_config"), dict):
            return {key: value}
        return {"text_config": {**raw["text_config"], key: value}}


def dense_mlp(arch: ModelArch) -> tuple[tuple[str, ...], str, str]:
    """(gate/up names, down name, config key of its width) of the dense MLP: the row-parallel
    linear whose input width a config key ending in "intermediate_size" holds, and the linears
    of its block that write that width. ((), "", "") when no layer has a dense MLP."""
    cfg = arch.text
    keys = {k: v for k, v in cfg.to_dict().items() if isinstance(v, int)
            and not isinstance(v, bool) and k.endswith("intermediate_size")}
    for kind in arch.kinds:
        moe = kind.moe
        for lin in kind.found.linears:
            if not lin.row or (moe is not None and lin.name.startswith(moe.disk_block + ".")):
                continue
            key = next((k for k in sorted(keys, key=lambda k: (k != "intermediate_size", k))
                        if keys[k] == lin.in_features), None)
            if key is None:
                continue
            block = lin.name.rpartition(".")[0]
            ups = tuple(x.name for x in kind.found.linears if x.name != lin.name
                        and x.name.rpartition(".")[0] == block
                        and x.out_features == lin.in_features)
            if ups:
                return ups, lin.name, key
    return (), "", families.width_key(arch.family)


def _signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures have one structure."""
    params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    kind = tuple(str(getattr(layer, a, "")) for a in ("attention_type", "layer_type",
                                                      "is_sliding", "use_moe"))
    return (type(layer).__name__,) + kind + params


def model_arch(raw_config: dict, disk_names=None) -> ModelArch:
    """The structure of the model `raw_config` (config.json) describes; `disk_names`: the
    checkpoint's tensor names, when there is one (else on-disk names are transformers' own
    renamings reversed). Raises InputError, one line saying what is missing, for a model
    that cannot be quantized."""
    names = tuple(sorted(disk_names)) if disk_names is not None else None
    key = json.dumps(raw_config, sort_keys=True, default=str)
    widths = _width_free(raw_config)
    base = _STRUCTURES.get(widths[0]) if names is None and widths is not None else None
    if base is not None:
        # MLP widths change shapes, never structure: only the shapes are read again (the
        # planner and the TP check try many widths of one model)
        try:
            return _rewidth_cached(id(base), key)
        except Exception as e:  # noqa: BLE001 -- a layer class we cannot build alone
            log.debug("rewidth of %s failed (%s); discovering", raw_config.get("model_type"), e)
    return _model_arch(key, names)


def _width_free(raw: dict):
    """(config with its MLP widths taken out, as JSON) or None when it has none."""
    def strip(d):
        return {k: (bool(v) if str(k).endswith("intermediate_size") and isinstance(v, int)
                    and not isinstance(v, bool) else strip(v) if isinstance(v, dict) else v)
                for k, v in d.items()}
    out = strip(raw)
    return (json.dumps(out, sort_keys=True, default=str),) if out != raw else None


# A discovered ModelArch per width-free config form (the first config of that form asked for)
_STRUCTURES: dict[str, ModelArch] = {}


@functools.lru_cache(maxsize=64)
def _rewidth_cached(base_id: int, key: str) -> ModelArch:
    raw = json.loads(key)
    base = next(a for a in _STRUCTURES.values() if id(a) == base_id)
    cfg = config_from_dict(raw)
    text = text_config(cfg)
    kinds = []
    for k, kind in enumerate(base.kinds):
        layer_cls = base.layer_classes[k]
        with torch.device("meta"):
            layer = layer_cls(text, kind.index)
        prepare_layer(layer, base.names)
        apply_renames(layer, base.renames[k])
        mods = dict(layer.named_modules())
        linears = tuple(replace(lin, in_features=mods[lin.name].in_features,
                                out_features=mods[lin.name].out_features)
                        for lin in kind.found.linears)
        sparse = kind.found.sparse
        spec = kind.spec
        if sparse is not None:
            experts = mods[f"{sparse.block}.{sparse.experts}"]
            sparse = replace(sparse, width=experts[0].width, num_experts=len(experts))
            assert spec.moe is not None  # a kind with a sparse block has an MoE spec
            spec = replace(spec, moe=replace(spec.moe, width=sparse.width,
                                             num_experts=sparse.num_experts))
        found = replace(kind.found, linears=linears, sparse=sparse)
        kinds.append(replace(kind, found=found, spec=spec))
    return replace(base, config=cfg, text=text, kinds=tuple(kinds),
                   fold_checks=base.fold_checks)


@functools.lru_cache(maxsize=16)
def _model_arch(config_json: str, disk_names) -> ModelArch:
    arch = _discover(config_json, disk_names)
    if disk_names is None:
        widths = _width_free(json.loads(config_json))
        if widths is not None:
            _STRUCTURES.setdefault(widths[0], arch)
    return arch


def _discover(config_json: str, disk_names) -> ModelArch:
    raw = json.loads(config_json)
    try:
        return _discover_model(raw, disk_names)
    except Unsupported as e:
        raise InputError(f"unsupported architecture {raw.get('model_type')!r}: {e}") from None


def _discover_model(raw: dict, disk_names) -> ModelArch:
    family = families.family_for(raw.get("model_type", ""))
    families.refuse_stated(family.model_type)
    cfg = config_from_dict(raw)
    reason = family.refusal(cfg)
    if reason:
        raise InputError(f"unsupported architecture {raw.get('model_type')!r}: {reason}")
    text = text_config(cfg)
    model = build_meta(cfg)
    mem_layers, layers = decoder_layers(model)
    names = NameMap(model, disk_names)
    # kinds of layer, before any change to the modules
    sigs: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        sigs.setdefault(_signature(layer), []).append(i)
    # per-layer call arguments, from transformers' own forward (masks, rotary tables)
    materialise_buffers(model, "cpu", skip=mem_layers)
    _materialise_small(model, mem_layers)
    ids = torch.zeros(1, DISCOVERY_TOKENS, dtype=torch.long)
    _, calls = capture_layer_calls(model, layers, ids, zero_embeddings=True)
    kinds, kind_of, renames = [], [0] * len(layers), {}
    for k, indices in enumerate(sigs.values()):
        i = indices[0]
        layer = layers[i]
        prepare_layer(layer, names)
        renames[k] = layer_renames(layer, f"{mem_layers}.{i}", names)
        apply_renames(layer, renames[k])
        hidden = torch.empty(1, DISCOVERY_TOKENS, int(text.hidden_size), device="meta")
        kwargs = _to_meta(calls[i])
        try:
            found = trace_layer(layer, hidden, kwargs, keep=family.kept_in_layers)
        except (InputError, Unsupported):
            raise
        except Exception as e:  # noqa: BLE001 -- a forward the meta device cannot run
            raise InputError(f"unsupported architecture {cfg.model_type!r}: structure "
                             f"discovery could not run {type(layer).__name__} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        kinds.append(_kind(i, tuple(indices), found, layer, family, cfg, names, mem_layers))
        for j in indices:
            kind_of[j] = k
    layers_prefix = _disk_layers_prefix(mem_layers, layers, names)
    kinds = [replace(kd, spec=replace(kd.spec, layers_prefix=layers_prefix)) for kd in kinds]
    text_paths = text_module_paths(model, mem_layers)
    arch = ModelArch(cfg.model_type, family, cfg, text, mem_layers, layers_prefix,
                     tuple(kinds), tuple(kind_of), renames, text_paths,
                     kept_modules(model, text_paths), names,
                     layer_classes=tuple(type(layers[kd.index]) for kd in kinds))
    checks = arch.fold_checks
    arch.kinds = tuple(replace(kd, spec=replace(kd.spec, fold_checks=checks))
                       for kd in arch.kinds)
    return arch


def _materialise_small(model: PreTrainedModel, mem_layers: str, limit: int = 1 << 24) -> None:
    """Zeros on the CPU for the small parameters of the text model outside its layers (an
    embedding norm, learned positions) so that its forward reaches the layers; the token
    embedding is stood in for, the head never reached."""
    decoder = mem_layers.rpartition(".")[0]
    embed = model.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()}
    for name, p in list(model.named_parameters()):
        if (not name.startswith(decoder + ".") and decoder) or name.startswith(mem_layers + ".") \
                or id(p) in skip or p.numel() > limit or not p.is_meta:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._parameters[attr] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype),
                                             requires_grad=False)


def _to_meta(obj):
    if torch.is_tensor(obj):
        return obj.to("meta")
    if isinstance(obj, tuple):
        return tuple(_to_meta(o) for o in obj)
    if isinstance(obj, list):
        return [_to_meta(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def prepare_layer(layer: nn.Module, names: NameMap) -> list[str]:
    """Swap the layer's fused experts for per-expert linears under their on-disk names (in
    place, on whatever device the layer is). Returns the experts modules' paths."""
    done = []
    for path, mod in list(layer.named_modules()):
        if isinstance(mod, (UnfusedExperts, nn.modules.conv._ConvNd)):
            continue  # a convolution's weight is 3-D too (Qwen3-Next's conv1d): kept as is
        fused = {n: p for n, p in mod.named_parameters(recurse=False) if p.dim() == 3}
        if not fused:
            continue
        sources = names.experts
        if "gate_up_proj" not in fused or "gate_up_proj" not in sources \
                or "down_proj" not in sources:
            raise Unsupported(f"{type(mod).__name__} stores experts as fused 3-D tensors "
                              f"{sorted(fused)} on disk as well; per-expert quantized tensors "
                              f"would have no on-disk names to keep")
        gate, up = sources["gate_up_proj"].leaves
        (down,) = sources["down_proj"].leaves
        parent, _, attr = path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr,
                unfused(mod, (gate, up, down)))
        done.append(path)
    return done


def layer_renames(layer: nn.Module, mem_prefix: str, names: NameMap) -> dict[str, str]:
    """{module path in memory: module path on disk} for the modules of one layer whose names
    differ, from its tensors' on-disk names: renames in place (Mixtral's mlp <->
    block_sparse_moe, PhiMoE's router <-> gate inside it) and moves of a whole module to
    another existing one (ERNIE-MoE's mlp.gate.moe_statics <-> mlp.moe_statics)."""
    index = mem_prefix.rsplit(".", 1)[-1]
    pairs: dict[str, str] = {}
    for rel in layer.state_dict(keep_vars=True):
        disk = names.to_disk(f"{mem_prefix}.{rel}")
        _, sep, tail = disk.partition(f".{index}.")
        if not sep:
            raise Unsupported(f"cannot place {disk} (memory {mem_prefix}.{rel}) in a layer")
        pairs[rel] = tail
    moves: dict[str, str] = {}
    deeper = {}
    for rel, tail in pairs.items():  # renames that keep the depth: one per path prefix
        mem_parts, disk_parts = rel.split("."), tail.split(".")
        if len(mem_parts) != len(disk_parts) or mem_parts[-1] != disk_parts[-1]:
            deeper[rel] = tail
            continue
        for depth in range(1, len(mem_parts)):
            m, d = ".".join(mem_parts[:depth]), ".".join(disk_parts[:depth])
            if moves.setdefault(m, d) != d:
                raise Unsupported(f"module {m} has tensors under two on-disk names")
    for path, _ in sorted(layer.named_modules(), key=lambda kv: kv[0].count(".")):
        under = {k[len(path) + 1:]: v for k, v in deeper.items() if k.startswith(path + ".")}
        if not path or not under or len(under) != sum(
                1 for k in pairs if k.startswith(path + ".")):
            continue  # a move takes the whole module
        heads = {v[:-len(k) - 1] if v.endswith("." + k) else None for k, v in under.items()}
        head = heads.pop() if len(heads) == 1 else None
        if head is not None:
            moves[path] = head
            for k in list(deeper):
                if k.startswith(path + "."):
                    del deeper[k]
    if deeper:
        rel, tail = next(iter(deeper.items()))
        raise Unsupported(f"transformers renames the on-disk tensor {tail} to {rel} inside "
                          f"a decoder layer in a way no module move reproduces")

    def implied(path: str) -> str:  # where a module lands when only its ancestors move
        parent, _, leaf = path.rpartition(".")
        if not parent:
            return path
        return f"{moves.get(parent) or implied(parent)}.{leaf}"

    return {m: d for m, d in moves.items() if d != implied(m)}


def apply_renames(layer: nn.Module, renames: dict[str, str]) -> None:
    """Register moved modules under their on-disk paths (state_dict, named_modules and
    get_submodule see those) while the layer's forward still finds them by attribute. The
    on-disk parent must exist (a rename, or a move to another existing module)."""
    found = dict(layer.named_modules())
    for mem, disk in sorted(renames.items(), key=lambda kv: kv[0].count(".")):
        if mem not in found:
            continue  # already moved (a second call on the same layer)
        child = found[mem]
        old_parent = found[mem.rpartition(".")[0]] if "." in mem else layer
        mem_leaf = mem.rpartition(".")[2]
        disk_parent, _, disk_leaf = disk.rpartition(".")
        try:
            new_parent = layer.get_submodule(disk_parent) if disk_parent else layer
        except AttributeError:
            raise Unsupported(f"transformers moves {disk} to {mem} inside a decoder layer, "
                              f"under a module ({disk_parent}) the layer does not have") from None
        if old_parent._modules.get(mem_leaf) is not child:
            continue
        old_parent._modules.pop(mem_leaf)
        new_parent._modules[disk_leaf] = child
        object.__setattr__(old_parent, mem_leaf, child)


def _disk_layers_prefix(mem_layers: str, layers, names: NameMap) -> str:
    """The decoder layers' name prefix on disk: from a checkpoint tensor of layer 0 when
    there is a checkpoint (an export names its quantized linears differently), else from
    transformers' renamings reversed."""
    mem0 = f"{mem_layers}.0."
    disk = next((d for d, m in names.disk_to_memory.items() if m.startswith(mem0)), None)
    if disk is None:
        rel = next(n for n, _ in layers[0].named_parameters())
        disk = names.to_disk(f"{mem0}{rel}")
    head, sep, _ = disk.partition(".0.")
    return head if sep else mem_layers


def kept_modules(model: nn.Module, text_paths: tuple[str, ...]) -> tuple[str, ...]:
    """Top-level modules the text forward does not use (vision tower, projector), by the
    attribute name vLLM's AWQ substring match and compressed-tensors' patterns recognise in
    both on-disk layouts ("visual" matches visual.* and model.visual.*)."""
    out: list[str] = []
    for path, mod in model.named_modules():
        if not path or any(t == path or t.startswith(path + ".") or path.startswith(t + ".")
                           for t in text_paths):
            continue
        if any(path.startswith(o + ".") for o in out):
            continue
        if any(True for _ in mod.parameters()):
            out.append(path)
    return tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p in out))


def _kind(index, indices, found: LayerFound, layer, family, cfg, names, mem_layers
          ) -> LayerKind:
    sparse = found.sparse
    moe = None
    norm = None
    block_groups: tuple[InputFound, ...] = ()
    if sparse is not None:
        block_disk = sparse.block
        moe = MoESpec(block=_mem_attr(layer, sparse.block), disk_block=block_disk,
                      expert_linears=sparse.leaves, num_experts=sparse.num_experts,
                      width=sparse.width, experts=sparse.experts, router=sparse.router,
                      shared=sparse.shared, shared_linears=sparse.shared_linears,
                      shared_gate=sparse.shared_gate)
        prefix = sparse.block + "."
        block_groups = tuple(g for g in found.inputs if g.linears[0].startswith(prefix))
        norm = next((g.producer for g in block_groups if not g.producer_is_linear
                     and g.producer), None)
    inputs = [g for g in found.inputs if g not in block_groups]
    groups = tuple(g.linears for g in inputs)
    scales = []
    kinds = {}
    for g in inputs:
        prev = g.producer or g.candidate
        if prev is None or g.blockers:
            continue
        judge = g.linears[0] if len(g.linears) == 1 else common_parent(g.linears)
        scales.append(ScaleGroup(prev, g.linears, judge=judge, also_scale=g.fold_only))
        if g.producer and not g.producer_is_linear:
            kinds[prev] = norm_fold_kind(layer.get_submodule(prev))
    if norm is not None:
        kinds[norm] = norm_fold_kind(layer.get_submodule(norm))
    scales = [s for s in scales if kinds.get(s.prev, "scale") is not None] + []
    spec = ArchSpec(name=cfg.model_type, layers_prefix="",
                    input_groups=groups, scale_groups=tuple(scales), mlp_gate_up=(),
                    mlp_down="", intermediate_key="", not_quantized=("lm_head",), moe=moe,
                    fold_kinds=tuple(sorted(kinds.items())),
                    notes=family.notes)
    spec = family.adjust(spec, found, cfg)
    return LayerKind(index, indices, found, spec, norm)


def _mem_attr(layer: nn.Module, disk_path: str) -> str:
    """The attribute path the layer's forward uses for a module registered under
    `disk_path` (they differ where apply_renames renamed it)."""
    mod = layer.get_submodule(disk_path)
    parent = layer.get_submodule(disk_path.rpartition(".")[0]) if "." in disk_path else layer
    for k, v in vars(parent).items():
        if v is mod and k not in ("_modules",):
            return (disk_path.rpartition(".")[0] + "." + k).lstrip(".")
    return disk_path

