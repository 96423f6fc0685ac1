"""Tokenize text and cut it into model inputs: random calibration windows, consecutive eval windows.

The documents of a source are joined with "\\n\\n" into one stream (the usual AWQ/GPTQ protocol)
and tokenized without special tokens. Tokenizing a very large corpus whole is slow and pointless
when only a few hundred thousand tokens are used, so the joined text is tokenized in pieces of
about PIECE_CHARS characters, cut at line ends, and only as many pieces as the request needs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from quantizer.errors import InputError

from .sources import load_texts

PIECE_CHARS = 256_000
# calibration draws its windows from about this many times the tokens it finally uses, so that
# random windows overlap little and the choice of text does not shrink to a few documents
CALIBRATION_POOL_FACTOR = 4


def tokenizer_for(model_dir: str | os.PathLike):
    """The tokenizer saved with a model directory (never fetched from the hub)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model directory does not exist: {model_dir}")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for "no/unusable tokenizer here"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"no usable tokenizer in {model_dir} ({first_line[:200]})") from None


def _piece_bounds(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of consecutive pieces of about PIECE_CHARS, each ending after a newline
    where one is near (a hard cut only inside a very long line)."""
    bounds, start = [], 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            newline = text.rfind("\n", start + PIECE_CHARS // 2, end)
            if newline != -1:
                end = newline + 1
        bounds.append((start, end))
        start = end
    return bounds


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: the "longer than the model's maximum length" warning is meaningless here
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def token_stream(tokenizer, documents: list[str], max_tokens: int | None = None, spread: bool = False):
    """Token ids (1-D LongTensor) of "\\n\\n".join(documents).

    max_tokens=None tokenizes everything. Otherwise tokenization stops once at least max_tokens
    ids exist: with spread=False those come from the start of the text (what the perplexity
    protocol needs); with spread=True from pieces spaced evenly over the whole text, in text
    order, so that calibration sees all of a corpus and not just its first documents."""
    text = "\n\n".join(documents)
    bounds = _piece_bounds(text)
    if max_tokens is not None and spread and len(bounds) > 1:
        first = _encode(tokenizer, text[slice(*bounds[0])])
        chars_per_token = (bounds[0][1] - bounds[0][0]) / max(len(first), 1)
        # one piece spare for the estimate's error; all chosen pieces are used, so that the
        # last part of the corpus is always among them
        wanted = min(len(bounds), math.ceil(max_tokens * chars_per_token / PIECE_CHARS) + 1)
        if wanted > 1:  # evenly spaced, first and last piece included
            step = (len(bounds) - 1) / (wanted - 1)
            bounds = [bounds[round(i * step)] for i in range(wanted)]
        else:
            bounds = bounds[:1]
    ids: list[int] = []
    for start, end in bounds:
        ids.extend(_encode(tokenizer, text[start:end]))
        if max_tokens is not None and not spread and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def calibration_batch(tokenizer, source: str = "builtin", samples: int = 128, seqlen: int = 512, seed: int = 0):
    """`samples` random windows of `seqlen` tokens, (samples, seqlen) LongTensor.

    Deterministic for a given (source, tokenizer, samples, seqlen, seed): the same text is
    tokenized and the window starts come from a torch.Generator seeded with `seed`."""
    if samples < 1 or seqlen < 1:
        raise InputError(f"calibration needs samples >= 1 and seqlen >= 1 (got {samples}, {seqlen})")
    ids = token_stream(tokenizer, load_texts(source), samples * seqlen * CALIBRATION_POOL_FACTOR, spread=True)
    if len(ids) < seqlen + 1:
        raise InputError(
            f"calibration source {source!r} has only {len(ids)} tokens, fewer than "
            f"--calib-seqlen {seqlen} + 1; give more text or a shorter --calib-seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, source: str = "wikitext2", seqlen: int = 512, max_windows: int | None = None):
    """Consecutive non-overlapping windows of `seqlen` tokens from the start of the text (the
    standard perplexity protocol), (n, seqlen) LongTensor; the first `max_windows` if given."""
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise InputError(f"evaluation needs seqlen >= 1 and max_windows >= 1 (got {seqlen}, {max_windows})")
    max_tokens = None if max_windows is None else max_windows * seqlen
    ids = token_stream(tokenizer, load_texts(source, flag="--data"), max_tokens)
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"evaluation source {source!r} has only {len(ids)} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
