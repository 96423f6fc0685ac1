"""Token weights: how much an error on each calibration token matters downstream.

A linear's error on token t lands in the residual stream h_t right after its block (attention
or MLP), and the next layer reads that stream through an RMSNorm, which divides it by
rms(h_t). So the error the rest of the model sees is ‖Δy_t‖ / rms(h_t), and its square weighs
each token by 1 / mean(h_t²). Plain calibration statistics (GPTQ's Hessian Σ x xᵀ, AWQ's
output MSE, the imatrix E[x²]) weigh every token alike instead, so a few tokens that carry a
massive activation (attention sinks: on SmolLM2-135M the first token of a window holds a
residual ~1000 against ~30 elsewhere from layer 11 to 28, and layer 28's down_proj input
reaches 2400 there) dominate them: the quantizer then spends its precision on tokens whose
errors the next norm divides away (measure with benchmarks/layer_lab.py; off by default).

`residual_token_weights(ctx)` runs the float layer once per calibration chunk and returns,
per block, 1 / mean(h_t²) for every token (float32, the chunk's (batch, seq) shape). Layers
that are not pre-norm residual (layer output ≠ input + Σ block outputs) get none, and the
methods then weigh tokens alike."""
from __future__ import annotations

import logging

import torch

from ..settings import TOKEN_WEIGHTS  # noqa: F401 (re-exported)
from .residual_share import block_of, layer_blocks, residual_stream

log = logging.getLogger(__name__)

# "outliers": a token whose stream's rms exceeds this many times its sequence's median
# counts as 1 / (rms / (factor · median))², every other token as 1
OUTLIER_FACTOR = 4.0


def token_weights_for(ctx, kind: str) -> dict[str, list[torch.Tensor]] | None:
    """The option's weights: none; outliers (1 for every token but those whose stream entering
    the block is massive against their sequence's median, which get the 1 / mean(h²) share
    of the rest); residual (1 / mean(h²) of the stream after each block); residual-in (of the
    stream entering each block)."""
    if kind == "none":
        return None
    tw = residual_token_weights(ctx, before=kind != "residual")
    if tw is None or kind != "outliers":
        return tw
    return {b: [outlier_weights(w) for w in ws] for b, ws in tw.items()}


def outlier_weights(inv_ms: torch.Tensor, factor: float | None = None) -> torch.Tensor:
    """min(1, factor² · median_ms / ms_t) per token from 1 / ms (..., seq), the median per
    sequence (so the weights do not depend on how samples were chunked)."""
    factor = OUTLIER_FACTOR if factor is None else factor
    ms = 1.0 / inv_ms
    med = ms.median(dim=-1, keepdim=True).values
    return torch.clamp(factor * factor * med / ms, max=1.0)


@torch.no_grad()
def residual_token_weights(ctx, before: bool = False) -> dict[str, list[torch.Tensor]] | None:
    """{block: [per-chunk (batch, seq) float32 weights]} for the layer's blocks, or None.
    before: weigh by the stream entering the block instead of leaving it."""
    out: dict[str, list[torch.Tensor]] = {b: [] for b in layer_blocks(ctx.arch)}

    def add(block, _y, h_before, h_after):
        ms = (h_before if before else h_after).square().mean(dim=-1)
        out[block].append(1.0 / ms.clamp_min(torch.finfo(torch.float32).tiny))

    with residual_stream(ctx, add) as check:
        for x in ctx.chunks():
            ctx.forward(x)
    if not check.residual or any(len(v) != len(ctx.inputs) for v in out.values()):
        log.info("layer %d: not in pre-norm residual form; tokens weigh alike", ctx.index)
        return None
    return out


def weights_for(token_weights: dict | None, name: str, chunk: int,
                x: torch.Tensor) -> torch.Tensor | None:
    """The weights of chunk `chunk` for linear `name` whose captured input is x, or None where
    there are none or x is not one row per token of the chunk (a routed expert's input)."""
    if token_weights is None:
        return None
    w = token_weights.get(block_of(name))
    if w is None:
        return None
    w = w[chunk]
    if x.shape[:-1] != w.shape:
        return None
    return w


__all__ = ["OUTLIER_FACTOR", "TOKEN_WEIGHTS", "outlier_weights", "residual_token_weights",
           "token_weights_for", "weights_for"]
