"""How much of the residual stream each block of a decoder layer writes: the weight of its
module groups' errors in the bits-per-weight optimiser.

The measurement records each group's *relative* output error ‖ΔY‖/‖Y‖. What the rest of the
model sees is the change to the residual stream, ‖ΔY‖/‖h‖ at the block's output: a block
that writes little into a large stream (most layers) matters less than one that writes most
of it (early layers writing the massive activations LLMs keep in a few channels). So a
group's squared error is weighted by its block's share E‖out‖² / E‖h_after‖², the block's
output energy over the stream's just after it. Errors of q/k/v and gate/up reach the stream
through their block's nonlinearity; their relative error stands in for the block's.

Measured on the float layer during the forward that propagates the measurement's inputs, for
pre-norm residual layers (h ← h + block(norm(h)), every family in quantizer/arch); a layer
whose output does not match that sum gets no shares (its groups weigh 1, and the report says
so)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# |h_in + Σ block outputs − layer output| / |layer output| beyond this: not the residual form
RESIDUAL_TOLERANCE = 1e-2


def block_of(name: str) -> str:
    """The layer's block a linear belongs to: its first name component ('self_attn', 'mlp',
    'block_sparse_moe')."""
    return name.split(".", 1)[0]


def block_module(layer: torch.nn.Module, arch, block: str) -> torch.nn.Module:
    try:
        return layer.get_submodule(block)
    except AttributeError:
        if arch.moe is not None and block == arch.moe.disk_block:
            return layer.get_submodule(arch.moe.block)  # on-disk name differs (Mixtral)
        raise


@contextlib.contextmanager
def residual_shares(ctx) -> Iterator[dict]:
    """Within the block, every full forward of ctx.layer adds to the statistics; on exit the
    yielded dict holds {block: {"output_sq", "residual_sq"}} (means over tokens of ‖out‖² and
    ‖h after the block‖²), or stays empty when the layer is not in residual form."""
    blocks = list(dict.fromkeys(block_of(n) for g in ctx.arch.input_groups for n in g))
    sums = {b: [0.0, 0.0, 0.0] for b in blocks}
    state = {"tokens": 0, "worst": 0.0}

    def layer_in(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        state["r"] = x.to(torch.float32)

    def block_out(block):
        def hook(mod, args, kwargs, out):
            y = (out[0] if isinstance(out, tuple) else out).to(torch.float32)
            state["r"] = state["r"] + y.reshape(state["r"].shape)
            sums[block][0] += float(y.square().sum(dtype=torch.float64))
            sums[block][1] += float(state["r"].square().sum(dtype=torch.float64))
            # per token ‖out_t‖² / ‖h_t‖²: what the next RMSNorm sees of this block's output,
            # not dominated by the few tokens whose stream is massive
            ratio = y.square().sum(-1) / state["r"].square().sum(-1).clamp_min(1e-30)
            sums[block][2] += float(ratio.sum(dtype=torch.float64))
        return hook

    def layer_out(mod, args, kwargs, out):
        y = (out[0] if isinstance(out, tuple) else out).to(torch.float32)
        r = state.pop("r")
        dev = float(torch.linalg.vector_norm(r - y) / torch.linalg.vector_norm(y).clamp_min(1e-30))
        state["worst"] = max(state["worst"], dev)
        state["tokens"] += y.numel() // y.shape[-1]

    handles = [ctx.layer.register_forward_pre_hook(layer_in, with_kwargs=True),
               ctx.layer.register_forward_hook(layer_out, with_kwargs=True)]
    handles += [block_module(ctx.layer, ctx.arch, b).register_forward_hook(
        block_out(b), with_kwargs=True) for b in blocks]
    result: dict = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    n = state["tokens"]
    if n and state["worst"] <= RESIDUAL_TOLERANCE:
        result.update({b: {"output_sq": s[0] / n, "residual_sq": s[1] / n,
                           "token_share": s[2] / n} for b, s in sums.items()})


__all__ = ["RESIDUAL_TOLERANCE", "block_module", "block_of", "residual_shares"]
