"""The model as transformers defines it, built on the meta device: only embeddings, rotary
tables, the final norm and the head are real; decoder layers are materialised one at a time."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .errors import InputError
from .source import CheckpointSource


def model_config(source: CheckpointSource, intermediate_size: int | None = None):
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.from_pretrained(source.path, local_files_only=True)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    if intermediate_size is not None:
        setattr(cfg, source.arch.intermediate_key, intermediate_size)
    # A quantized checkpoint's config carries quantization_config; the skeleton is plain.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def build_skeleton(source: CheckpointSource, device, dtype: torch.dtype,
                   intermediate_size: int | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = model_config(source, intermediate_size)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    # MoE: fused expert parameters -> per-expert linears named as on disk (still on meta)
    from .moe import unfuse_model
    unfuse_model(decoder_layers(model), source.arch, cfg)
    layers_prefix = source.arch.layers_prefix + "."
    wanted = {}
    for name, _ in model.named_parameters():
        if not name.startswith(layers_prefix):
            wanted[name] = name
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    available = set(source.names())
    to_load = [n for n in wanted if n in available]
    tensors = source.load(to_load, device=device, dtype=dtype)
    for name in wanted:
        if name in tensors:
            _set_param(model, name, tensors[name])
        elif not (tied and name.endswith("lm_head.weight")):
            raise InputError(f"checkpoint {source.path} lacks tensor {name}")
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    # Rotary tables are non-persistent buffers computed at init: rebuild them for real.
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if hasattr(inner, "rotary_emb"):
        rot = inner.rotary_emb
        inner.rotary_emb = type(rot)(config=cfg).to(device)
    return model


def _set_param(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.layers


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


def load_layer(model: nn.Module, source: CheckpointSource, index: int, device, dtype,
               intermediate_size: int | None = None,
               tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Materialise decoder layer `index` on `device` from the checkpoint (or given tensors)."""
    prefix = source.arch.layer_prefix(index)
    if tensors is None:
        tensors = source.load_stored(source.layer_names(index))
    # Quantized originals (quantizer/originals.py): dequantized here, on the device, one
    # tensor at a time, straight into the working dtype.
    from .originals import StoredWeight
    tensors = {k: v.dequantize(device, dtype) if isinstance(v, StoredWeight) else v
               for k, v in tensors.items()}
    if intermediate_size is not None:
        pad_mlp(tensors, source.arch, prefix, intermediate_size)
    layer = decoder_layers(model)[index]
    local = {}
    for k, v in tensors.items():
        local[k[len(prefix) + 1:]] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
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


def release_layer(model: nn.Module, index: int) -> None:
    """Give layer `index`'s memory back (the module returns to the meta device)."""
    layers = decoder_layers(model)
    layers[index] = layers[index].to("meta")


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.captured = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = (hidden_states, kwargs)
        raise _Stop


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, input_ids: torch.Tensor):
    """Run the model's own embedding/rotary/mask code on one batch and stop at layer 0.

    Returns (hidden_states, kwargs) where kwargs (position embeddings, mask, position ids)
    are what every decoder layer receives for a batch of this sequence length."""
    layers = decoder_layers(model)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with contextlib.suppress(_Stop):
            model(input_ids=input_ids, use_cache=False)
    finally:
        layers[0] = catcher.inner
    if catcher.captured is None:
        raise RuntimeError("layer-0 inputs were not captured")
    hidden, kwargs = catcher.captured
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache",
                                                            "output_attentions", "cache_position")}
    return hidden, kwargs


def layer_output(out):
    """Decoder layers return a tensor (transformers 5) or a tuple (4.x)."""
    return out[0] if isinstance(out, (tuple, list)) else out


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
