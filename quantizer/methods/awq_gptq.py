"""AWQ followed by GPTQ, as one method: per layer, AWQ's activation-aware scales are searched
and folded into the float weights (AWQ.smooth), then GPTQ rounds the smoothed weights against
Hessians of the smoothed inputs (true-sequential, as plain GPTQ). AWQ's clipping is not used:
GPTQ's error feedback does what clipping does for round-to-nearest.

Options: AWQ's scale-search options (grid, duo_scaling) and GPTQ's (damp, act_order,
static_groups, block, scale_search for GPTQ's group parameters); token_weights applies to
both (computed once per layer, on the float layer)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import InputError
from ..kernels.packing import QuantizedWeight
from ..settings import (AWQOptions, GPTQOptions, OPTION_FIELDS, checked_options,
                        rounding_with)
from .awq import AWQ
from .gptq import GPTQ


class AWQGPTQ:
    name = "awq-gptq"
    needs_calibration = True

    def __init__(self, options: tuple[AWQOptions, GPTQOptions] | None = None, rounding=None,
                 module_settings: dict[str, tuple[int, int]] | None = None, **overrides):
        """`options`: (AWQOptions, GPTQOptions) (default: their defaults), `rounding`
        (settings.RoundingOptions), keyword overrides of either (grid=10, damp=0.05)."""
        r = rounding_with(rounding, overrides, "awq-gptq")
        awq, gptq = options or (AWQOptions(), GPTQOptions())
        given: dict[str, dict] = {"awq": {}, "gptq": {}}
        known = sorted(n for n, (key, f) in OPTION_FIELDS.items()
                       if key in given and self.name in f.metadata["methods"])
        for name, value in overrides.items():
            if name not in known:
                raise InputError(f"unknown awq-gptq option {name!r}; known: "
                                 f"{', '.join(known)}, scale_search, token_weights")
            given[OPTION_FIELDS[name][0]][name] = value
        awq = checked_options(replace(awq, **given["awq"]), self.name)
        # no act-order unless asked for (the AWQ layout holds no g_idx)
        gptq = checked_options(replace(gptq, **given["gptq"]), self.name).plain()
        self.awq = AWQ(replace(awq, clip=False), rounding=replace(r, scale_search=None))
        self.gptq = GPTQ(gptq, rounding=r, module_settings=module_settings)
        self.module_settings = self.gptq.module_settings

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantizedWeight]:
        self.awq.smooth(ctx)
        ctx.mark("smooth")
        return self.gptq.quantize_weighted(ctx, self.awq._tw)

