"""Streamed evaluation: perplexity and next-token KL, computed layer-major (every window through
layer i, then i+1), so neither the original nor the quantized model is ever loaded whole."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.sampling import eval_windows
from ..errors import InputError
from ..parallel.distributed import resolve_devices
from ..plan.machine import check_device
from ..settings import check_device_name, parse_devices
from ..stream.skeleton import capture_layer_inputs, embed_inputs, kwargs_to_device, layer_output
from ..stream.tokens import tokenizer_or_bytes
from .loader import LayerLoader

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    data: str
    windows: int
    seqlen: int
    tokens: int
    base_ppl: float | None
    quant_ppl: float
    kl: float | None  # mean KL(P_base || P_quant) per token, nats
    seconds: float
    base: str | None
    quantized: str
    note: str | None = None  # why there is no original to compare with, when there is none

    def __str__(self) -> str:
        lines = [f"perplexity on {self.data}: {self.windows} windows x {self.seqlen} tokens"]
        if self.base_ppl is not None:
            lines.append(f"  original  : {self.base_ppl:.4f}   ({self.base})")
        elif self.note:
            lines.append(f"  original  : -   ({self.note})")
        lines.append(f"  quantized : {self.quant_ppl:.4f}   ({self.quantized})")
        if self.kl is not None:
            lines.append(f"  KL(original || quantized): {self.kl:.5f} nats/token")
        return "\n".join(lines)

    __repr__ = __str__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def layer_devices(devices, num_layers: int) -> list[torch.device]:
    """Pipeline placement: contiguous runs of layers per device, in the order given (layer i
    on devices[i * D // L])."""
    devices = [torch.device(d) for d in devices]
    return [devices[i * len(devices) // num_layers] for i in range(num_layers)]


@torch.no_grad()
def final_hidden(loader: LayerLoader, windows: torch.Tensor, device, chunk: int,
                 progress: bool = False, desc: str = "eval",
                 devices=None) -> list[torch.Tensor]:
    """Hidden states after the last decoder layer for every window, kept on the CPU. With
    `devices`, each layer runs on its pipeline placement (layer_devices); every tensor it
    sees is moved there explicitly."""
    model = loader.model
    _, calls = capture_layer_inputs(model, windows[:1])
    placement = layer_devices(devices or [device], loader.num_layers)
    kwargs_on = {d: kwargs_to_device(calls, d, loader.dtype) for d in set(placement)}
    hs = [embed_inputs(model, windows[i:i + chunk]).to("cpu", loader.dtype)
          for i in range(0, len(windows), chunk)]
    for i in tqdm(range(loader.num_layers), desc=desc, unit="layer", disable=not progress):
        dev = placement[i]
        loader.device = dev  # the loader materialises the next layer on its placed device
        layer = loader.load(i)
        hs = [layer_output(layer(h.to(dev), **kwargs_on[dev][i])).to("cpu") for h in hs]
        loader.release(i)
    return hs


@torch.no_grad()
def _log_probs(loader: LayerLoader, h: torch.Tensor, device) -> torch.Tensor:
    model = loader.model
    inner = model.get_submodule(loader.source.arch.mem_layers.rpartition(".")[0])
    norm = inner.get_submodule("norm").to(device)
    head = model.get_output_embeddings().to(device)
    logits = head(norm(h.to(device))).float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def evaluate(quantized, base=None, data: str = "wikitext2", seqlen: int = 512,
             max_windows: int | None = 40, device: str = "auto", chunk: int = 4,
             progress: bool = True, devices=None) -> EvalResult:
    """Perplexity of `quantized` (any checkpoint we can read) and, when `base` is given or
    recorded in the export's layerquant.json, of the original and the KL between them.

    devices (e.g. ["cuda:0", "cuda:1"]): spread the layers over them (contiguous runs; the
    head runs on the first). Evaluation streams one layer at a time, so one GPU always fits;
    this places work where the caller wants it (and is what the cuda:1 tests use)."""
    t0 = time.perf_counter()
    quantized = Path(quantized)
    if not quantized.exists():
        raise InputError(f"model path does not exist: {quantized}")
    if base is not None and not Path(base).is_dir():
        raise InputError(f"--base {base}: no such model directory")
    base, note = (base, None) if base is not None else recorded_original(quantized)
    if note:
        log.warning("%s", note)
    if devices:
        devices = resolve_devices(parse_devices(devices) if isinstance(devices, str)
                                  else tuple(devices))
        device = devices[0]
    check_device_name(device)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    check_device(dev, text=device)
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    q_loader = LayerLoader(quantized, dtype, dev)
    windows = eval_tokens(q_loader, data, seqlen, max_windows)
    q_hidden = final_hidden(q_loader, windows, dev, chunk, progress, "eval quantized", devices)
    b_loader = LayerLoader(base, dtype, dev) if base is not None else None
    b_hidden = (final_hidden(b_loader, windows, dev, chunk, progress, "eval original", devices)
                if b_loader else None)
    nll_q = nll_b = kl = 0.0
    count = 0
    for k, start in enumerate(range(0, len(windows), chunk)):
        ids = windows[start:start + chunk].to(dev)
        target = ids[:, 1:].reshape(-1)
        lq = _log_probs(q_loader, q_hidden[k], dev)[:, :-1].reshape(-1, _vocab(q_loader))
        nll_q += float(F.nll_loss(lq, target, reduction="sum"))
        if b_loader is not None and b_hidden is not None:
            lb = _log_probs(b_loader, b_hidden[k], dev)[:, :-1].reshape(-1, _vocab(b_loader))
            nll_b += float(F.nll_loss(lb, target, reduction="sum"))
            kl += float((lb.exp() * (lb - lq)).sum())
        count += target.numel()
    return EvalResult(data=data, windows=len(windows), seqlen=seqlen, tokens=count,
                      base_ppl=math.exp(nll_b / count) if b_loader else None,
                      quant_ppl=math.exp(nll_q / count), kl=kl / count if b_loader else None,
                      seconds=time.perf_counter() - t0, base=str(base) if base else None,
                      quantized=str(quantized), note=note)


def recorded_original(quantized: Path) -> tuple[str | None, str | None]:
    """(the original recorded in the export's layerquant.json, None) when it is still there;
    (None, why not) when it was recorded but is gone, so that the missing original perplexity
    and KL are said, not silently dropped; (None, None) for a checkpoint of another tool."""
    meta = quantized / "layerquant.json"
    if not meta.is_file():
        return None, None
    try:
        recorded = json.loads(meta.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None, f"{meta} is unreadable: no original to compare with; pass --base DIR"
    if recorded and Path(recorded).is_dir():
        return recorded, None
    return None, (f"the original model recorded in {meta} ({recorded}) is gone: perplexity of "
                  f"the quantized model only, no original ppl or KL; pass --base DIR to compare")


def eval_tokens(loader: LayerLoader, data: str, seqlen: int, max_windows) -> torch.Tensor:
    tok, _ = tokenizer_or_bytes(loader.source)
    windows = eval_windows(tok, source=data, seqlen=seqlen, max_windows=max_windows)
    if len(windows) == 0:
        raise InputError(f"evaluation text {data!r} is shorter than one {seqlen}-token window")
    return windows


def _vocab(loader: LayerLoader) -> int:
    return loader.model.get_output_embeddings().weight.shape[0]


