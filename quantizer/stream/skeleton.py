"""The model as transformers defines it, built on the meta device: only embeddings, rotary
tables, the final norm and the head are real; decoder layers are materialised one at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..arch.meta import (build_meta, capture_layer_calls, config_from_dict,
                         materialise_buffers, text_config)
from ..arch.meta import decoder_layers as _decoder_layers
from ..arch.meta import layer_output as layer_output  # re-exported beside load_layer
from ..arch.model import apply_renames, prepare_layer
from ..errors import InputError
from .originals import StoredWeight
from .source import CheckpointSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def model_config(source: CheckpointSource, intermediate_size: int | None = None):
    cfg = config_from_dict(source.raw_config)
    cfg.use_cache = False
    text_config(cfg).use_cache = False
    if intermediate_size is not None:
        setattr(text_config(cfg), source.arch.intermediate_key, intermediate_size)
    # A quantized checkpoint's config carries quantization_config; the skeleton is plain.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def build_skeleton(source: CheckpointSource, device, dtype: torch.dtype,
                   intermediate_size: int | None = None, text_only: bool = True
                   ) -> PreTrainedModel:
    """transformers' model on the meta device with the tensors outside the decoder layers
    loaded on `device` (text_only: those the text forward uses; a vision tower stays meta),
    and every decoder layer's fused experts unfused and its modules under on-disk names."""
    arch = source.arch
    cfg = model_config(source, intermediate_size)
    model = build_meta(cfg, dtype)
    layers = model.get_submodule(arch.mem_layers)
    assert isinstance(layers, nn.ModuleList)  # arch.mem_layers: decoder_layers' path
    for i, layer in enumerate(layers):
        prepare_layer(layer, arch.names)
        apply_renames(layer, arch.renames[arch.kind_of[i]])
    materialise_buffers(model, device, skip=arch.mem_layers)
    layers_prefix = arch.mem_layers + "."
    wanted = [name for name, _ in model.named_parameters()
              if not name.startswith(layers_prefix)
              and (not text_only or _under(name, arch.text_modules))]
    tied = _tied_names(model, cfg)
    to_load = {}
    for name in wanted:
        disk = arch.names.to_disk(name)
        if disk in source.weight_map:
            to_load[disk] = name
        elif name not in tied:
            raise InputError(f"checkpoint {source.path} lacks tensor {disk}")
    tensors = source.load(list(to_load), device=device, dtype=dtype)
    for disk, name in to_load.items():
        _set_param(model, name, tensors[disk])
    for target, src in tied.items():  # the head shares the loaded embedding
        try:
            shared = model.get_parameter(src)
        except AttributeError:
            continue
        mod_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        if not shared.is_meta and getattr(owner, attr).is_meta:
            setattr(owner, attr, shared)
    return model


def _under(name: str, paths) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in paths)


def _tied_names(model: PreTrainedModel, cfg) -> dict[str, str]:
    """{parameter: the parameter transformers ties it to} (lm_head to the embeddings)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        return dict(keys)
    if not (getattr(cfg, "tie_word_embeddings", False)
            or getattr(text_config(cfg), "tie_word_embeddings", False)):
        return {}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    heads = [f"{p}.weight" for p, m in model.named_modules() if m is head]
    embeds = [f"{p}.weight" for p, m in model.named_modules() if m is embed]
    return {h: embeds[0] for h in heads} if embeds else {}


def _set_param(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return _decoder_layers(model)[1]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad], 0)


def pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] == cols:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], cols - t.shape[1]))], 1)


def pad_mlp(tensors: dict[str, torch.Tensor], arch, prefix: str, size: int) -> None:
    """Zero-pad the MLP intermediate width to `size`, in place: extra gate/up rows and
    down_proj columns are zero, so the extra channels contribute exactly zero (silu(0)*0 = 0)."""
    if not size:
        return
    for name in arch.mlp_gate_up:
        for suffix in (".weight", ".bias"):
            key = f"{prefix}.{name}{suffix}"
            if key in tensors:
                tensors[key] = pad_rows(tensors[key], size)
    key = f"{prefix}.{arch.mlp_down}.weight"
    if key in tensors:
        tensors[key] = pad_cols(tensors[key], size)


def load_layer(model: PreTrainedModel, source: CheckpointSource, index: int, device, dtype,
               intermediate_size: int | None = None,
               tensors: dict | None = None) -> nn.Module:
    """Materialise decoder layer `index` on `device` from the checkpoint (or given tensors)."""
    prefix = source.arch.layer_prefix(index)
    if tensors is None:
        tensors = source.load_stored(source.layer_names(index))
    # Quantized originals (quantizer/originals.py): dequantized here, on the device, one
    # tensor at a time, straight into the working dtype.
    tensors = {k: v.dequantize(device, dtype) if isinstance(v, StoredWeight) else v
               for k, v in tensors.items()}
    if intermediate_size is not None:
        pad_mlp(tensors, source.arch, prefix, intermediate_size)
    layer = decoder_layers(model)[index]
    local = {}
    for k, v in tensors.items():
        # over the bus as stored, converted on the device: torch converts a blocking host ->
        # GPU copy on the host (fp16 -> bf16 cost ~0.1 s of a 7B layer's load on the H100)
        v = v.to(device)
        local[k[len(prefix) + 1:]] = v.to(dtype) if v.is_floating_point() else v
    missing, unexpected = _assign(layer, local)
    if missing or unexpected:
        raise InputError(f"layer {index}: tensors do not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return layer


def _assign(layer: nn.Module, state: dict[str, torch.Tensor]):
    result = layer.load_state_dict(state, strict=False, assign=True)
    for p in layer.parameters():
        p.requires_grad_(False)
    return list(result.missing_keys), list(result.unexpected_keys)


def release_layer(model: PreTrainedModel, index: int) -> None:
    """Give layer `index`'s memory back (the module returns to the meta device)."""
    layers = decoder_layers(model)
    layers[index] = layers[index].to("meta")


@torch.no_grad()
def capture_layer_inputs(model: PreTrainedModel, input_ids: torch.Tensor):
    """Run the model's own embedding/rotary/mask code on one batch with the decoder layers
    stood in for: (hidden states entering layer 0, [kwargs of layer i]). Sliding and full
    attention layers get different masks, some families different rotary tables; a kwargs
    object shared by several layers is one object here too."""
    return capture_layer_calls(model, decoder_layers(model), input_ids)


@torch.no_grad()
def embed_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering decoder layer 0, as the model's own forward makes them
    (Gemma scales its embeddings in the model's forward, not in the embedding module)."""
    return capture_layer_calls(model, decoder_layers(model), input_ids, first_only=True)[0]


def capture_layer0_inputs(model: PreTrainedModel, input_ids: torch.Tensor):
    """(hidden_states, kwargs) entering layer 0 (position embeddings, mask, position ids)."""
    hidden, calls = capture_layer_inputs(model, input_ids)
    return hidden, calls[0]


def kwargs_to_device(calls: list[dict], device, dtype) -> list[dict]:
    """to_device for every layer's kwargs, each shared tensor moved once."""
    memo: dict[int, object] = {}

    def move(obj):
        if torch.is_tensor(obj):
            if id(obj) not in memo:
                memo[id(obj)] = to_device(obj, device, dtype)
            return memo[id(obj)]
        if isinstance(obj, (tuple, list)):
            return type(obj)(move(o) for o in obj)
        if isinstance(obj, dict):
            return {k: move(v) for k, v in obj.items()}
        return obj

    return [move(c) for c in calls]


def to_device(obj, device, dtype):
    """Move tensors in nested kwargs (position embeddings, masks) to a device; floating
    tensors also take `dtype`, integer ones (position ids) keep theirs."""
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def check_layer_shapes(model, source, intermediate: int, padded: int | None) -> None:
    """Every decoder-layer tensor of the checkpoint has the shape that transformers' model of
    this config.json has (`model`: the meta skeleton, its MLP padded to `padded` when set), so
    a weight that disagrees with config.json is refused before the first layer, in one line."""
    arch = source.arch
    logical = getattr(source, "_logical", {})  # quantized originals (quantizer/originals.py)
    for i, layer in enumerate(decoder_layers(model)):
        prefix = arch.layer_prefix(i)
        for name, param in layer.named_parameters():
            key = f"{prefix}.{name}"
            if key not in source.weight_map:
                continue  # a missing tensor is named when the layer is loaded
            if key in logical and logical[key].shape is None:
                continue  # pack-quantized: its shape is a stored value, checked when read
            module = name.rsplit(".", 1)[0]
            have = list(source.shape(key))
            want = _config_shape(list(param.shape), module, arch, intermediate, padded)
            if have != want:
                raise InputError(f"{source.path}: tensor {key} has shape {have} but "
                                 f"config.json makes it {want}: the weights and config.json "
                                 f"disagree")


def _config_shape(shape: list[int], module: str, arch, intermediate: int,
                  padded: int | None) -> list[int]:
    """A skeleton parameter's shape as config.json gives it: before our MLP padding."""
    if padded and module in arch.mlp_gate_up and shape[0] == padded:
        shape[0] = intermediate
    elif padded and module == arch.mlp_down and len(shape) == 2 and shape[1] == padded:
        shape[1] = intermediate
    return shape
