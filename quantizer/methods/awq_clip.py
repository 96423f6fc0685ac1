"""AWQ's weight-clipping search and the float fake-quantizer both AWQ searches use.

Clipping (AutoAWQ `_compute_best_clip`): for every (output row, quantization group) of a
linear, try shrinking the group's range to r·max|w| for r = 1, 1 - 1/n, ... (down to, not
including, 1 - max_shrink) and keep the r whose quantized weights give the smallest mean
squared error of that group's partial dot products with sampled input tokens."""
from __future__ import annotations

import torch

from .rtn import check_group_size, group_params, quantize_codes

# Elements per temporary (rows x tokens x groups, or rows x in_features) in the clip search:
# 2^24 float32 = 64 MiB, so a row batch never costs more than a few hundred MiB in total.
_CLIP_BATCH_ELEMENTS = 1 << 24


def fake_quantize_groups(wg: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize float32 `wg` whose last dim is one quantization group.

    Same arithmetic as rtn_quantize(...).dequantize(float32) (group_params + quantize_codes),
    without building a QuantizedWeight, so the search scores exactly what gets written."""
    scale, zero = group_params(wg, bits, symmetric)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (quantize_codes(wg, scale, zero, bits) - zero) * scale


def fake_quantize_float(w: torch.Tensor, bits: int, group_size: int,
                        symmetric: bool) -> torch.Tensor:
    """(out, in) weight -> float32 quantize-dequantized weight (group_size -1 = per row)."""
    out_f, in_f = w.shape
    gs = check_group_size(in_f, group_size)
    wg = w.float().reshape(out_f, in_f // gs, gs)
    return fake_quantize_groups(wg, bits, symmetric).reshape(out_f, in_f)


# A token is massive in a layer input when its largest |x| exceeds this many times the
# median over its sequence of every token's largest |x| (attention sinks: SmolLM2-135M's
# layer 28 down_proj reads 2394 on one channel of each sequence's first token, ~20 elsewhere)
MASSIVE_RATIO = 20.0
# Massive tokens kept per calibration sequence for the clip search (the largest first)
MASSIVE_PER_SAMPLE = 4


def massive_tokens(x: torch.Tensor, per_sample: int, keep: int = MASSIVE_PER_SAMPLE,
                   ratio: float = MASSIVE_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """For x (samples * per_sample, features): (index (samples, keep) into x's rows, valid
    (samples, keep) bool) of each sequence's massive tokens, the largest first."""
    amax = x.abs().amax(dim=-1).float().reshape(-1, per_sample)  # (samples, per_sample)
    med = amax.median(dim=-1, keepdim=True).values
    k = min(keep, per_sample)
    top, pos = amax.topk(k, dim=-1)
    valid = top > ratio * med.clamp_min(torch.finfo(torch.float32).tiny)
    base = torch.arange(amax.shape[0], device=x.device).unsqueeze(-1) * per_sample
    return pos + base, valid


def shrink_ratios(clip_grid: int, max_shrink: float) -> list[float]:
    """The reference's candidate ratios: 1 - i/clip_grid for i < max_shrink·clip_grid
    (20 steps, max_shrink 0.5 -> 1.00, 0.95, ..., 0.55)."""
    n = max(1, int(max_shrink * clip_grid))
    return [1.0 - i / clip_grid for i in range(n)]


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int,
                symmetric: bool, ratios: list[float],
                token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Best clip ratio per (row, group) of `weight` (out, in) for inputs `x` (tokens, in).

    Returns (ratio tensor (out, n_groups) float32, stats). The error of one group is the
    mean over tokens of (x_g · q(w_g) - x_g · w_g)^2 (weighted by `token_weight` (tokens,)
    when given: a stratified sample's weights), computed in float32 with batched matmuls
    (groups are the batch), rows processed in batches to bound memory."""
    out_f, in_f = weight.shape
    gs = check_group_size(in_f, group_size)
    n_groups = in_f // gs
    n_tok = x.shape[0]
    xg = x.float().reshape(n_tok, n_groups, gs).transpose(0, 1)  # (G, T, gs)
    rows_per_batch = max(1, min(out_f, _CLIP_BATCH_ELEMENTS // max(n_groups * n_tok, in_f)))
    ratio_t = torch.tensor(ratios, dtype=torch.float32, device=weight.device)
    tw = None if token_weight is None else (
        token_weight.to(weight.device, torch.float32) / token_weight.sum()).view(1, -1, 1)
    best_ratio = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    err_unclipped = torch.zeros((), dtype=torch.float64, device=weight.device)
    err_best = torch.zeros((), dtype=torch.float64, device=weight.device)
    for r0 in range(0, out_f, rows_per_batch):
        wb = weight[r0:r0 + rows_per_batch].float().reshape(-1, n_groups, gs)  # (b, G, gs)
        ref = torch.bmm(xg, wb.permute(1, 2, 0))  # (G, T, b): exact partial dot products
        amax = wb.abs().amax(dim=-1, keepdim=True)  # (b, G, 1)
        best_err: torch.Tensor | None = None
        best: torch.Tensor | None = None
        for i in range(len(ratios)):
            limit = amax * ratio_t[i]
            q = fake_quantize_groups(torch.maximum(torch.minimum(wb, limit), -limit),
                                     bits, symmetric)
            d2 = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow_(2)  # (G, T, b)
            err = (d2.mean(dim=1) if tw is None else (d2 * tw).sum(dim=1)).t()  # (b, G)
            if best_err is None or best is None:  # the first ratio
                best_err = err
                best = torch.full_like(err, ratios[0])
                err_unclipped += err.sum(dtype=torch.float64)
            else:
                better = err < best_err  # strict: ties keep the larger ratio, deterministic
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, ratio_t[i], best)
        assert best_err is not None and best is not None  # `ratios` is not empty
        best_ratio[r0:r0 + wb.shape[0]] = best
        err_best += best_err.sum(dtype=torch.float64)
    unclipped = float(err_unclipped)
    stats = {
        "tokens": n_tok,
        "mean_ratio": float(best_ratio.mean()),
        "clipped_fraction": float((best_ratio < 1.0).float().mean()),
        "err_ratio": float(err_best) / unclipped if unclipped > 0 else 1.0,
    }
    return best_ratio, stats


def sample_token_indices(total: int, k: int, seed: int, device=None) -> torch.Tensor:
    """Sorted indices of `k` of `total` tokens drawn by a seeded CPU generator (identical on
    every device). Random rather than strided: a fixed stride over concatenated sequences
    keeps landing on the same positions (e.g. always the attention-sink first token)."""
    if k >= total:
        return torch.arange(total, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(total, generator=gen)[:k].sort().values
    return idx.to(device) if device is not None else idx
