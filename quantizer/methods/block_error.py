"""What a module group's quantization does to its block's output: the error the bits-per-
weight optimiser compares across groups.

A group's own relative output error ‖ΔY‖/‖Y‖ says little about q/k/v or gate/up: their
outputs go through softmax attention or the SwiGLU product before they reach the residual
stream, and how much an error there grows or shrinks differs by layer and by group (on
SmolLM2, weighing q/k/v by the attention block's residual share alone sent attention to 2-3
bits and perplexity from 44 to 95 at 4.0 bpw). So, as ExLlamaV2 does, each candidate is run
through the block on calibration tokens and judged on the block's output. For o_proj and
down_proj the block's output *is* the group's output, so their Hessian error already is
this number and no forward is spent on them.

Routed-expert groups keep their own output error: one forward of a sparse block per expert
and candidate is too many (and an expert's share of the block is its routing's business)."""
from __future__ import annotations

import contextlib
import math

import torch

from quantizer.kernels.packing import QuantizedWeight
from quantizer.methods.context import run_module

from .residual_share import block_module, block_of

# Tokens each block judge runs per candidate: enough to rank candidates (the Hessian errors
# use every calibration token), few enough that a measurement pass stays about a dozen
# quantizations of the model.
BLOCK_ERROR_TOKENS = 16384


class BlockJudge:
    """The float block's inputs (first chunks, up to `max_tokens`) and outputs; `error()`
    gives the block's relative output error with some of its linears replaced."""

    def __init__(self, ctx, block: str, max_tokens: int = BLOCK_ERROR_TOKENS,
                 token_weights: dict | None = None):
        self.ctx, self.block = ctx, block
        self.module = block_module(ctx.layer, ctx.arch, block)
        self.data: list[tuple[torch.Tensor, dict]] = []
        # per chunk: each token's weight (methods/token_weights.py), or None (alike)
        self.weights = None if token_weights is None else token_weights.get(block)
        tokens = 0
        # closing() removes capture's hooks when the loop stops early: the chunks after the
        # first max_tokens need no forward at all
        with contextlib.closing(ctx.capture([block], with_kwargs=True)) as captures:
            for seen in captures:
                x, kwargs = seen[block]
                self.data.append((x, kwargs))
                tokens += x.numel() // x.shape[-1]
                if tokens >= max_tokens:
                    break
        self.refs = [run_module(self.module, x, kw) for x, kw in self.data]

    @torch.no_grad()
    def error(self, weights: dict[str, QuantizedWeight]) -> float:
        """‖block(x) − block_float(x)‖ / ‖block_float(x)‖ with each named linear's weight
        replaced by its quantized value, then restored."""
        saved = {}
        try:
            for name, q in weights.items():
                lin = self.ctx.module(name)
                saved[name] = lin.weight.data
                lin.weight.data = q.dequantize_to(torch.empty_like(lin.weight.data))
            num = den = 0.0
            for k, ((x, kw), ref) in enumerate(zip(self.data, self.refs)):
                out = run_module(self.module, x, kw).to(torch.float32)
                ref = ref.to(torch.float32)
                d2, r2 = (out - ref).square(), ref.square()
                if self.weights is not None and self.weights[k].shape == ref.shape[:-1]:
                    w = self.weights[k].to(ref.device, torch.float32).unsqueeze(-1)
                    d2, r2 = d2 * w, r2 * w
                num += float(d2.sum(dtype=torch.float64))
                den += float(r2.sum(dtype=torch.float64))
        finally:
            for name, w in saved.items():
                self.ctx.module(name).weight.data = w
        return math.sqrt(num / den) if den > 0 else 0.0


def judge_for(ctx, group: tuple[str, ...], judges: dict,
              token_weights: dict | None = None) -> BlockJudge | None:
    """The block judge for a group whose error must go through its block (q/k/v, gate/up),
    made once per block; None where the group's own output is the block's (o_proj,
    down_proj: the last group of its block) or the block is a sparse-expert one."""
    block = block_of(group[0])
    moe = ctx.arch.moe
    if moe is not None and block in (moe.block, moe.disk_block):
        return None
    members = [g for g in ctx.arch.input_groups if block_of(g[0]) == block]
    if group == members[-1]:
        return None
    if block not in judges:
        judges[block] = BlockJudge(ctx, block, token_weights=token_weights)
    return judges[block]


__all__ = ["BLOCK_ERROR_TOKENS", "BlockJudge", "judge_for"]
