"""`quantize eval OUT`: perplexity (and KL against the original), streamed layer by layer."""
from __future__ import annotations

from ..validate.evaluation import evaluate


def run(a) -> int:
    result = evaluate(a.model, base=a.base, data=a.data, seqlen=a.seqlen,
                      max_windows=a.max_windows, device=a.device,
                      progress=not (a.no_progress or a.json), devices=a.devices)
    print(result.to_json() if a.json else result)
    return 0
