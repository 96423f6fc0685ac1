"""Importance of each input column of a linear: the (token-weighted) mean of x_j² over the
calibration tokens, what the importance-weighted grid (methods/grid.py) weighs rounding
errors by (llama.cpp's imatrix)."""
from __future__ import annotations

import torch

from quantizer.parallel.shards import fold_tensors, fold_values, layout_of

from .token_weights import weights_for


@torch.no_grad()
def second_moments(ctx, names: list[str], token_weights: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """{name: (in_features,) float32 E_w[x²]} of the named linears' inputs, from one capture
    pass. Summed one sample at a time per calibration shard and folded in shard order, so the
    result does not depend on the chunking or the number of processes."""
    layout = layout_of(ctx)
    sums: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    counts: dict[str, dict[int, float]] = {n: {} for n in names}
    for k, seen in enumerate(ctx.capture(names)):
        s = layout.shard_of[k]
        for n in names:
            x = seen[n]
            w = weights_for(token_weights, n, k, x)
            rows = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)
            ws = None if w is None else w.reshape(rows.shape[0], rows.shape[1])
            for i, sample in enumerate(rows):
                sq = sample.float().square()
                if ws is not None:
                    wi = ws[i].to(sq.device, torch.float32)
                    part = (sq * wi.unsqueeze(-1)).sum(dim=0)
                    cnt = float(wi.sum())
                else:
                    part, cnt = sq.sum(dim=0), float(sample.shape[0])
                sums[n][s] = part if s not in sums[n] else sums[n][s] + part
                counts[n][s] = counts[n].get(s, 0.0) + cnt
    return {n: fold_tensors(layout, sums[n]) / max(fold_values(layout, counts[n]), 1e-30)
            for n in names}


__all__ = ["second_moments"]
