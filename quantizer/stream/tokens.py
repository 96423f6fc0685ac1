"""Which tokenizer turns text into this checkpoint's token ids."""
from __future__ import annotations

from ..calibration import sampling
from .source import CheckpointSource


class ByteTokenizer:
    """Fallback for checkpoints that ship no tokenizer (generated test models): UTF-8 bytes
    folded into the vocabulary. Quantization speed and memory do not depend on token identity,
    and the result is deterministic."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens: bool = False, **_):
        if isinstance(text, list):
            return {"input_ids": [self.encode(t) for t in text]}
        return {"input_ids": self.encode(text)}


def has_tokenizer(path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                              "vocab.json"))


def tokenizer_or_bytes(source: CheckpointSource):
    """(tokenizer, note): the checkpoint's own tokenizer, else the byte fallback with a note."""
    if has_tokenizer(source.path):
        return sampling.tokenizer_for(source.path), None
    vocab = int(source.arch.text.vocab_size)  # a VLM keeps it in text_config
    return ByteTokenizer(vocab), f"no tokenizer in {source.path}: using UTF-8 bytes mod {vocab}"


def calibration_batch(tokenizer, source: str, samples: int, seqlen: int, seed: int):
    return sampling.calibration_batch(tokenizer, source=source, samples=samples, seqlen=seqlen,
                                      seed=seed)
