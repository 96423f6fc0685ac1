"""Calibration coverage of a MoE layer's routed experts: tokens per expert over the float pass
(counted by arch/experts.py's UnfusedExperts), summed over processes, and the stated
fallback for experts that saw too few."""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..arch.base import ArchSpec
from ..arch.experts import experts_module
from ..methods.rtn import rtn_quantize
from ..parallel.distributed import comm_device

if TYPE_CHECKING:
    from ..arch.model import ModelArch

log = logging.getLogger(__name__)


class ExpertCoverage:
    """Tokens per routed expert over the calibration pass, and the stated fallback: an expert
    that saw fewer than `min_tokens` tokens is not calibrated (its activation statistics and
    Hessian would rest on a handful of tokens, or none) but rounded to nearest (RTN), with a
    warning; its gate/up still take the post-attention norm's AWQ fold, so they read the same
    inputs as before. The counts and the fallbacks go into the layer's report."""

    def __init__(self, layer: nn.Module, arch: ModelArch, config, index: int, min_tokens: int,
                 calibrated: bool = True):
        self.arch, self.config, self.index = arch, config, index
        self.min_tokens = int(min_tokens)
        # without calibration data there is nothing to count and nothing to fall back from
        self.moe = calibrated and arch.is_moe_layer(config, index)
        moe = arch.moe
        self.experts = experts_module(layer, moe) if self.moe and moe is not None else None
        self.counts: torch.Tensor | None = None

    def __enter__(self):
        if self.experts is not None:
            self.experts.start_counting()
        return self

    def __exit__(self, *exc):
        if self.experts is not None:
            self.counts = self.experts.stop_counting()
        return False

    def sum_over_ranks(self, w) -> None:
        """Several processes each count their own calibration share: every rank must see the
        whole run's counts so that all of them fall back for the same experts (integer sums
        are exact in any order)."""
        if self.counts is None or not w.distributed:
            return
        total = self.counts.to(comm_device(w), torch.int64)
        dist.all_reduce(total)
        self.counts = total.cpu()

    @property
    def fallback(self) -> tuple[int, ...]:
        if self.counts is None:
            return ()
        return tuple(int(e) for e in torch.nonzero(self.counts < self.min_tokens).flatten())

    def layer_arch(self) -> ArchSpec:
        return self.arch.for_layer(self.config, self.index, self.fallback)

    def fallback_linears(self) -> list[str]:
        fallback, moe = self.fallback, self.arch.moe
        if not fallback or moe is None:  # experts fall back in MoE layers only
            return []
        return [moe.expert(e, k) for e in fallback for k in range(3)]

    def quantize_fallbacks(self, ctx, quantized: dict,
                           module_settings: dict | None = None) -> None:
        """RTN for the experts the method was not given (at the bits / group size the bit
        allocation chose for them, if any), and the report entries."""
        if self.counts is None:
            return
        s = ctx.settings
        moe = self.arch.moe
        assert moe is not None  # counts come from an MoE layer
        for name in self.fallback_linears():
            bits, gs = (module_settings or {}).get(ctx.full_name(name), (s.bits, s.group_size))
            quantized[name] = rtn_quantize(ctx.module(name).weight.data, int(bits), int(gs),
                                           s.symmetric, name=ctx.full_name(name))
        block = f"{moe.disk_block}.{moe.experts}"
        ctx.stats["expert_tokens"] = {str(e): int(c) for e, c in enumerate(self.counts)}
        ctx.stats["expert_fallback"] = {str(e): "rtn" for e in self.fallback}
        ctx.stats["expert_min_tokens"] = self.min_tokens
        if self.fallback:
            msg = (f"layer {self.index}: {len(self.fallback)} of {len(self.counts)} experts saw "
                   f"fewer than {self.min_tokens} calibration tokens and are rounded to "
                   f"nearest (RTN) instead: " + ", ".join(
                       f"{block}.{e} ({int(self.counts[e])})" for e in self.fallback))
            log.warning("%s", msg)
            warnings.warn(msg, stacklevel=2)
