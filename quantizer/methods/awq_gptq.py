"""AWQ followed by GPTQ, as one method: per layer, AWQ's activation-aware scales are searched
and folded into the float weights (AWQ.smooth), then GPTQ rounds the smoothed weights against
Hessians of the smoothed inputs (true-sequential, as plain GPTQ). AWQ's clipping is not used:
GPTQ's error feedback does what clipping does for round-to-nearest.

Options: AWQ's scale-search options (grid, duo_scaling) and GPTQ's (damp, act_order,
static_groups, block, scale_search for GPTQ's group parameters); token_weights applies to
both (computed once per layer, on the float layer)."""
from __future__ import annotations

import torch

from quantizer.kernels.packing import QuantizedWeight

from . import register_method
from .awq import AWQ
from .gptq import GPTQ

AWQ_KEYS = ("duo_scaling", "grid", "cache_device", "rtn_baseline", "keep_identity",
            "weighted_stat")
GPTQ_KEYS = ("damp", "act_order", "static_groups", "block", "module_settings", "report_error",
             "scale_search")


class AWQGPTQ:
    name = "awq-gptq"
    needs_calibration = True

    def __init__(self, token_weights: str = "none", **options):
        unknown = sorted(set(options) - set(AWQ_KEYS) - set(GPTQ_KEYS))
        if unknown:
            from quantizer.errors import InputError
            raise InputError(f"unknown awq-gptq option(s) {unknown}; known: "
                             f"{', '.join(AWQ_KEYS + GPTQ_KEYS)}, token_weights")
        self.awq = AWQ(clip=False, token_weights=token_weights,
                       **{k: v for k, v in options.items() if k in AWQ_KEYS})
        self.gptq = GPTQ(token_weights=token_weights,
                         **{k: v for k, v in options.items() if k in GPTQ_KEYS})
        self.module_settings = self.gptq.module_settings

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        self.awq.smooth(ctx)
        ctx.mark("smooth")
        return self.gptq.quantize_weighted(ctx, self.awq._tw)


register_method("awq-gptq", AWQGPTQ)
