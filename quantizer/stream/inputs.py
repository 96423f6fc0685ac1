"""Is this model a usable input? Checks made on what a run reads, before anything is written:
config.json's numbers, weights whose shapes disagree with config.json, a calibration length
beyond the model's context. (An original that is already quantized is read or refused by
quantizer/originals.py's `original_format`, the one place that recognises them.)"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..plan.shapes import ModelShapes


def check_config(raw_config: dict, cfg_file: Path) -> None:
    """config.json's numbers that every stage reads (layers, widths, heads) are positive
    integers: a missing or string num_hidden_layers is one line, not a KeyError later."""
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
