"""Mixture-of-experts layers as named nn.Linear modules, and calibration coverage per expert.

transformers 5 stores a sparse block's experts fused: one (E, 2I, H) gate_up and one (E, H, I)
down parameter, while checkpoints on disk (and vLLM) keep one tensor per expert linear.
`unfused` (called by prepare_layer in model.py) stands in `UnfusedExperts` for each: a
ModuleList of small SwiGLU MLPs whose linears' full names are the on-disk tensor names and
whose forward takes what the fused module takes and computes the same thing. Loading, capture,
methods, export and `quantizer.load` then see ordinary named linears, one expert at a time;
no stacked copy of all experts is ever made.

While counting is on, each expert adds up how many tokens the router sent to it;
run/expert_coverage.py turns those counts into the fallback for experts that saw too few."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import Unsupported
from .base import MoESpec


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), linears named as on disk."""

    def __init__(self, names: tuple[str, str, str], hidden: int, width: int, act,
                 device=None, dtype=None):
        super().__init__()
        self.names = tuple(names)
        self.width = int(width)
        for name, (i, o) in zip(names, ((hidden, width), (hidden, width), (width, hidden))):
            self.add_module(name, nn.Linear(i, o, bias=False, device=device, dtype=dtype))
        self.act_fn = act
        self.tokens_seen: int | None = None  # counted here, not by the caller, so that a
        # block that indexes experts itself (transformers 4.x's ModuleList layout) is counted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens_seen is not None:
            self.tokens_seen += x.numel() // x.shape[-1]
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts module: forward(hidden_states (T, H),
    top_k_index (T, k), top_k_weights (T, k)) -> (T, H), each expert's output weighted by its
    routing weight and summed per token, as the fused module does."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.route_all = False  # structure discovery: every expert sees every token

    def __iter__(self) -> Iterator[ExpertMLP]:
        for expert in super().__iter__():
            assert isinstance(expert, ExpertMLP)
            yield expert

    def start_counting(self) -> None:
        for expert in self:
            expert.tokens_seen = 0

    def stop_counting(self) -> torch.Tensor:
        """Tokens each expert was called on since start_counting (int64, CPU)."""
        counts = torch.tensor([expert.tokens_seen or 0 for expert in self], dtype=torch.int64)
        for expert in self:
            expert.tokens_seen = None
        return counts

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, **aliases):
        if self.route_all:  # meta tensors: no routing, each expert reached once
            out = torch.zeros_like(hidden_states)
            for expert in self:
                out = out + expert(hidden_states)
            return out
        index = top_k_index if top_k_index is not None else aliases.get("selected_experts")
        weights = top_k_weights if top_k_weights is not None else aliases.get(
            "routing_weights")
        if index is None or weights is None:
            raise TypeError("UnfusedExperts needs the routing: top_k_index and top_k_weights")
        if index.is_floating_point() and not weights.is_floating_point():
            index, weights = weights, index  # tolerate the other argument order
        dev = hidden_states.device
        index, weights = index.to(dev), weights.to(dev)  # routers may run on another device
        out = torch.zeros_like(hidden_states)
        valid = (index >= 0) & (index < self.num_experts)  # expert-parallel masks use -1 / E
        for e in torch.unique(index[valid]).tolist():
            token, slot = torch.where(index == e)
            y = self[e](hidden_states[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


# The fused layout UnfusedExperts reproduces (transformers' use_experts_implementation flags).
_STANDARD_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False,
                    "is_concatenated": True, "has_post_expert_norm": False}


def fused_layout_problem(fused: nn.Module) -> str | None:
    """Why `fused` is not per-expert SwiGLU with [gate; up] (E, 2I, H) and down (E, H, I)
    weights, or None when it is."""
    for attr, want in _STANDARD_LAYOUT.items():
        have = getattr(fused, attr, want)
        if have != want:
            return f"{type(fused).__name__}.{attr} is {have} (supported: {want})"
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return f"{type(fused).__name__} has no gate_up_proj / down_proj parameters"
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2] \
            or gate_up.shape[2] != down.shape[1]:
        return (f"{type(fused).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                f"{tuple(down.shape)} are not (E, 2I, H) and (E, H, I)")
    from transformers.integrations import moe as hf_moe
    default = getattr(hf_moe, "_default_apply_gate", None)
    if default is not None and getattr(type(fused), "_apply_gate", default) is not default:
        return f"{type(fused).__name__} has its own gating function"
    return None


def unfused(fused: nn.Module, leaves: tuple[str, str, str]) -> UnfusedExperts:
    """UnfusedExperts standing in for `fused` (same device and dtype; on the meta skeleton this
    allocates nothing), its expert linears named `leaves` as on disk."""
    problem = fused_layout_problem(fused)
    if problem:
        raise Unsupported(f"experts of this layout are not supported: {problem}")
    down = fused.down_proj
    assert isinstance(down, torch.Tensor)  # fused_layout_problem checked it
    num, hidden, width = int(down.shape[0]), int(down.shape[1]), int(down.shape[2])
    act = getattr(fused, "act_fn", None) or nn.SiLU()
    return UnfusedExperts([ExpertMLP(leaves, hidden, width, act, down.device, down.dtype)
                           for _ in range(num)])


def experts_module(layer: nn.Module, moe: MoESpec) -> UnfusedExperts:
    return getattr(getattr(layer, moe.block), moe.experts)
