"""Is this model a usable input? Checks made on what a run reads, before anything is written:
config.json's numbers, weights whose shapes disagree with config.json, a calibration length
beyond the model's context. (An original that is already quantized is read or refused by
quantizer/originals.py's `original_format`, the one place that recognises them.)"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

def check_config(raw_config: dict, cfg_file: Path) -> None:
    """config.json's numbers that every stage reads (layers, widths, heads) are positive
    integers: a missing or string num_hidden_layers is one line, not a KeyError later."""
    from ..plan.shapes import ModelShapes
    try:
        ModelShapes.from_config(raw_config)
    except InputError as e:
        raise InputError(str(e).replace("config.json:", f"{cfg_file}:", 1)) from None


def check_calibration_length(raw_config: dict, seqlen: int, samples: int) -> None:
    """A calibration sequence may not exceed the model's context (max_position_embeddings):
    beyond it rotary positions are extrapolated and the attention's memory grows with the
    square of the length (100k tokens was a killed run, not a result)."""
    cfg = raw_config if "max_position_embeddings" in raw_config else \
        raw_config.get("text_config") or {}
    context = cfg.get("max_position_embeddings")
    if samples > 0 and isinstance(context, int) and context > 0 and seqlen > context:
        raise InputError(f"--calib-seqlen {seqlen} is longer than the model's context of "
                         f"{context} tokens (max_position_embeddings): use at most {context}")


def check_layer_shapes(model, source, intermediate: int, padded: int | None) -> None:
    """Every decoder-layer tensor of the checkpoint has the shape that transformers' model of
    this config.json has (`model`: the meta skeleton, its MLP padded to `padded` when set), so
    a weight that disagrees with config.json is refused before the first layer, in one line."""
    from .skeleton import decoder_layers
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
