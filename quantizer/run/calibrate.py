"""Calibrate: the token ids every layer is calibrated on (the checkpoint's tokenizer, or UTF-8
bytes when it ships none), drawn once per job with the seed; the layer loop embeds them."""
from __future__ import annotations

import torch

from ..methods.registry import needs_calibration
from ..stream.tokens import calibration_batch, tokenizer_or_bytes


def calibration_tokens(job) -> torch.Tensor | None:
    """(samples, seqlen) token ids for job (run.job.Job), or None when the method needs none
    and none were asked for; a tokenizer note goes into the job's notes."""
    c = job.settings.calib
    if not needs_calibration(job.settings.method) and c.samples <= 0:
        return None
    tok, note = tokenizer_or_bytes(job.source)
    if note:
        job.notes.append(note)
    return calibration_batch(tok, c.source, c.samples, c.seqlen, c.seed)
