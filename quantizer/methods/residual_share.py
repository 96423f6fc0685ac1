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
from dataclasses import dataclass
from typing import Callable, Iterator

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


def layer_blocks(arch) -> list[str]:
    """The blocks of a layer that hold its linears, in execution order."""
    return list(dict.fromkeys(block_of(n) for g in arch.input_groups for n in g))


@dataclass
class ResidualCheck:
    """How well every traced forward matched h_out = h_in + Σ block outputs."""

    worst: float = 0.0  # largest |h_in + Σ block outputs − layer output| / |layer output|
    tokens: int = 0  # tokens of the forwards seen

    @property
    def residual(self) -> bool:
        return self.worst <= RESIDUAL_TOLERANCE


BlockHook = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def residual_stream(ctx, on_block: BlockHook) -> Iterator[ResidualCheck]:
    """Within the block, every full forward of ctx.layer follows the residual stream (float32)
    through the layer's blocks: at each block's output `on_block(block, out, h_before,
    h_after)`, h_after = h_before + out; the yielded check says whether the sum matched the
    layer's output."""
    check = ResidualCheck()
    state: dict = {}

    def layer_in(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        state["r"] = x.to(torch.float32)

    def block_out(block):
        def hook(mod, args, kwargs, out):
            y = (out[0] if isinstance(out, tuple) else out).to(torch.float32)
            before = state["r"]
            state["r"] = before + y.reshape(before.shape)
            on_block(block, y, before, state["r"])
        return hook

    def layer_out(mod, args, kwargs, out):
        y = (out[0] if isinstance(out, tuple) else out).to(torch.float32)
        r = state.pop("r")
        dev = float(torch.linalg.vector_norm(r - y) / torch.linalg.vector_norm(y).clamp_min(1e-30))
        check.worst = max(check.worst, dev)
        check.tokens += y.numel() // y.shape[-1]

    handles = [ctx.layer.register_forward_pre_hook(layer_in, with_kwargs=True),
               ctx.layer.register_forward_hook(layer_out, with_kwargs=True)]
    handles += [block_module(ctx.layer, ctx.arch, b).register_forward_hook(
        block_out(b), with_kwargs=True) for b in layer_blocks(ctx.arch)]
    try:
        yield check
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def residual_shares(ctx) -> Iterator[dict]:
    """Within the block, every full forward of ctx.layer adds to the statistics; on exit the
    yielded dict holds {block: {"output_sq", "residual_sq"}} (means over tokens of ‖out‖² and
    ‖h after the block‖²), or stays empty when the layer is not in residual form."""
    sums = {b: [0.0, 0.0, 0.0] for b in layer_blocks(ctx.arch)}

    def add(block, y, _before, r):
        sums[block][0] += float(y.square().sum(dtype=torch.float64))
        sums[block][1] += float(r.square().sum(dtype=torch.float64))
        # per token ‖out_t‖² / ‖h_t‖²: what the next RMSNorm sees of this block's output,
        # not dominated by the few tokens whose stream is massive
        ratio = y.square().sum(-1) / r.square().sum(-1).clamp_min(1e-30)
        sums[block][2] += float(ratio.sum(dtype=torch.float64))

    result: dict = {}
    with residual_stream(ctx, add) as check:
        yield result
    n = check.tokens
    if n and check.residual:
        result.update({b: {"output_sq": s[0] / n, "residual_sq": s[1] / n,
                           "token_share": s[2] / n} for b, s in sums.items()})


__all__ = ["RESIDUAL_TOLERANCE", "ResidualCheck", "block_module", "block_of", "layer_blocks",
           "residual_shares", "residual_stream"]
