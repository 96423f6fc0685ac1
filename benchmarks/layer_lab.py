"""Layer-isolated quality experiments on the CPU (issue 20): capture the float inputs of every
decoder layer once, then quantize one layer at a time with any method variant and judge it on
held-out tokens, without running a whole quantization.

    # once (float32; ~1 min for SmolLM2 on 2 shared cores): calibration = 8 x 512 tokens of
    # WikiText-2 test's second half (seed 0, as the real protocol draws them); held-out = the
    # head's windows 48..55 (never in the benchmark's first 40 evaluation windows)
    python benchmarks/layer_lab.py capture --out lab/smollm2
    # one or more layers x variants: the per-layer error table
    python benchmarks/layer_lab.py run --lab lab/smollm2 --layers 28,29 --variants awq,rtn
    # the activation statistics of the linears' inputs (massive activations)
    python benchmarks/layer_lab.py stats --lab lab/smollm2

Errors, all on the held-out tokens, all relative to the float layer:
- `delta`: ||y_q - y|| / ||y - x||, the error of what the layer adds to the residual stream;
- `normed`: the error after the next layer's input RMSNorm (what the next layer reads; the
  final norm after the last layer), which discounts changes to massive residual channels that
  the norm divides away;
- `kl` (with --kl): the model's next-token KL to the float model with only this layer
  quantized, on the held-out windows (layers after it run in float).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quantizer.settings import CalibSettings, QuantSettings  # noqa: E402
from quantizer.methods.context import LayerContext  # noqa: E402
from quantizer.stream.skeleton import (build_skeleton, capture_layer0_inputs, decoder_layers,  # noqa: E402
                                       layer_output, load_layer, release_layer)
from quantizer.stream.source import CheckpointSource  # noqa: E402

# Variant name -> (method, options, settings overrides). Settings overrides: symmetric.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "rtn": ("rtn", {}, {}),
    "rtn-sym": ("rtn", {}, {"symmetric": True}),
    "awq": ("awq", {}, {}),
    "awq-noclip": ("awq", {"clip": False}, {}),
    # the clip search on the random token sample alone (before the massive-token fix)
    "awq-randclip": ("awq", {}, {"massive_per_sample": 0}),
    "awq-tw": ("awq", {"token_weights": "residual"}, {}),
    "awq-tw-rawstat": ("awq", {"token_weights": "residual", "weighted_stat": False}, {}),
    "awq-imx": ("awq", {"scale_search": "imatrix"}, {}),
    "awq-tw-imx": ("awq", {"token_weights": "residual", "scale_search": "imatrix"}, {}),
    "awq-tw-noclip-imx": ("awq", {"token_weights": "residual", "scale_search": "imatrix",
                                  "clip": False}, {}),
    "awq-gptq": ("awq-gptq", {}, {}),
    "awq-gptq-tw": ("awq-gptq", {"token_weights": "residual"}, {}),
    "awq-gptq-tw-imx": ("awq-gptq", {"token_weights": "residual", "scale_search": "imatrix"},
                        {}),
    "awq-gptq-sas-tw-imx": ("awq-gptq", {"token_weights": "residual", "act_order": True,
                                         "static_groups": True, "scale_search": "imatrix"},
                            {"symmetric": True}),
    "rtn-imx": ("rtn", {"scale_search": "imatrix"}, {}),
    "rtn-imx-twin": ("rtn", {"scale_search": "imatrix", "token_weights": "residual-in"}, {}),
    "rtn-imx-two": ("rtn", {"scale_search": "imatrix", "token_weights": "outliers"}, {}),
    "gptq-two": ("gptq", {"token_weights": "outliers"}, {}),
    "gptq-sas-two": ("gptq", {"act_order": True, "static_groups": True,
                              "token_weights": "outliers"}, {"symmetric": True}),
    "gptq-as": ("gptq", {"act_order": True, "static_groups": True}, {}),
    "gptq-as-two": ("gptq", {"act_order": True, "static_groups": True,
                             "token_weights": "outliers"}, {}),
    "gptq-as-two-imx": ("gptq", {"act_order": True, "static_groups": True,
                                 "token_weights": "outliers", "scale_search": "imatrix"}, {}),
    "gptq-sas-two-imx": ("gptq", {"act_order": True, "static_groups": True,
                                  "token_weights": "outliers", "scale_search": "imatrix"},
                         {"symmetric": True}),
    "gptq-two-imx": ("gptq", {"token_weights": "outliers", "scale_search": "imatrix"}, {}),
    "awq-two": ("awq", {"token_weights": "outliers"}, {}),
    "gptq-two16": ("gptq", {"token_weights": "outliers"}, {"outlier_factor": 16.0}),
    "gptq-imx": ("gptq", {"scale_search": "imatrix"}, {}),
    "gptq-as-imx": ("gptq", {"act_order": True, "static_groups": True,
                             "scale_search": "imatrix"}, {}),
    "gptq-sas-imx": ("gptq", {"act_order": True, "static_groups": True,
                              "scale_search": "imatrix"}, {"symmetric": True}),
    "awq-gptq-imx": ("awq-gptq", {"scale_search": "imatrix"}, {}),
    "awq-gptq-sas-imx": ("awq-gptq", {"act_order": True, "static_groups": True,
                                      "scale_search": "imatrix"}, {"symmetric": True}),
    "gptq-sas-two16": ("gptq", {"act_order": True, "static_groups": True,
                                "token_weights": "outliers"},
                       {"symmetric": True, "outlier_factor": 16.0}),
    "gptq-sas-two16-imx": ("gptq", {"act_order": True, "static_groups": True,
                                    "token_weights": "outliers", "scale_search": "imatrix"},
                           {"symmetric": True, "outlier_factor": 16.0}),
    "gptq-as-two16-imx": ("gptq", {"act_order": True, "static_groups": True,
                                   "token_weights": "outliers", "scale_search": "imatrix"},
                          {"outlier_factor": 16.0}),
    "gptq-two16-imx": ("gptq", {"token_weights": "outliers", "scale_search": "imatrix"},
                       {"outlier_factor": 16.0}),
    "awq-gptq-two16": ("awq-gptq", {"token_weights": "outliers"}, {"outlier_factor": 16.0}),
    "awq-two16": ("awq", {"token_weights": "outliers"}, {"outlier_factor": 16.0}),
    "awq-gptq-two": ("awq-gptq", {"token_weights": "outliers"}, {}),
    "awq-gptq-two-imx": ("awq-gptq", {"token_weights": "outliers", "scale_search": "imatrix"},
                         {}),
    "gptq-twin": ("gptq", {"token_weights": "residual-in"}, {}),
    "gptq-sas-twin": ("gptq", {"act_order": True, "static_groups": True,
                               "token_weights": "residual-in"}, {"symmetric": True}),
    "awq-twin": ("awq", {"token_weights": "residual-in"}, {}),
    "awq-gptq-twin": ("awq-gptq", {"token_weights": "residual-in"}, {}),
    "rtn-imx-tw": ("rtn", {"scale_search": "imatrix", "token_weights": "residual"}, {}),
    "gptq-tw": ("gptq", {"token_weights": "residual"}, {}),
    "gptq-imx-tw": ("gptq", {"token_weights": "residual", "scale_search": "imatrix"}, {}),
    "gptq-sas-tw": ("gptq", {"act_order": True, "static_groups": True,
                             "token_weights": "residual"}, {"symmetric": True}),
    "gptq-sas-imx-tw": ("gptq", {"act_order": True, "static_groups": True,
                                 "token_weights": "residual", "scale_search": "imatrix"},
                        {"symmetric": True}),
    "gptq-as-imx-tw": ("gptq", {"act_order": True, "static_groups": True,
                                "token_weights": "residual", "scale_search": "imatrix"}, {}),
    "gptq": ("gptq", {}, {}),
    "gptq-act-static": ("gptq", {"act_order": True, "static_groups": True}, {}),
    "gptq-sym-act-static": ("gptq", {"act_order": True, "static_groups": True},
                            {"symmetric": True}),
    "gptq-act": ("gptq", {"act_order": True}, {}),
}


def default_model() -> Path:
    from quantizer.demo.smollm2 import smollm2_checkpoint
    return smollm2_checkpoint()


# ---------------------------------------------------------------- capture
@torch.no_grad()
def capture(model_dir: Path, out: Path, calib_source: str, samples: int, seqlen: int,
            heldout_first: int, heldout: int) -> None:
    """Every layer's float input for the calibration and held-out tokens, in float32, plus
    the final hidden states' logits' reference for the KL."""
    from quantizer.stream.tokens import calibration_batch, tokenizer_or_bytes
    from quantizer.calibration.sampling import eval_windows
    source = CheckpointSource(model_dir)
    tok, _ = tokenizer_or_bytes(source)
    calib = calibration_batch(tok, calib_source, samples, seqlen, 0)
    wins = eval_windows(tok, "wikitext2", seqlen, heldout_first + heldout)
    held = wins[heldout_first:heldout_first + heldout]
    tokens = torch.cat([calib, held])
    model = build_skeleton(source, "cpu", torch.float32)
    _, kwargs = capture_layer0_inputs(model, tokens[:1])
    x = model.get_input_embeddings()(tokens)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib, "heldout": held, "model": str(model_dir),
                "calib_source": calib_source, "heldout_windows": [heldout_first,
                                                                   heldout_first + heldout],
                "kwargs": kwargs}, out / "meta.pt")
    n = source.num_layers
    for i in range(n):
        t0 = time.perf_counter()
        torch.save(x.clone(), out / f"layer{i:03d}.pt")
        layer = load_layer(model, source, i, "cpu", torch.float32)
        x = torch.cat([layer_output(layer(x[k:k + 4], **kwargs)) for k in range(0, len(x), 4)])
        release_layer(model, i)
        print(f"layer {i}: {time.perf_counter() - t0:.1f}s", flush=True)
    torch.save(x, out / f"layer{n:03d}.pt")


class Lab:
    def __init__(self, path: Path):
        self.path = path
        self.meta = torch.load(path / "meta.pt", weights_only=False)
        self.source = CheckpointSource(self.meta["model"])
        self.model = build_skeleton(self.source, "cpu", torch.float32)
        self.n_calib = len(self.meta["calib"])

    def inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.load(self.path / f"layer{i:03d}.pt")
        return x[:self.n_calib], x[self.n_calib:]

    def next_norm(self, i: int):
        """The RMSNorm that reads layer i's output: layer i+1's input norm or the final one."""
        n = self.source.num_layers
        if i + 1 < n:
            layer = load_layer(self.model, self.source, i + 1, "cpu", torch.float32)
            norm = copy.deepcopy(layer.input_layernorm)  # the layer goes back to meta
            release_layer(self.model, i + 1)
            return norm
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        return inner.norm

    def context(self, i: int, layer, settings: QuantSettings, chunk: int = 4) -> LayerContext:
        calib, _ = self.inputs(i)
        arch = self.source.arch.for_layer(self.model.config, i)
        return LayerContext(i, layer, arch, self.model.config, settings,
                            [calib[k:k + chunk] for k in range(0, len(calib), chunk)],
                            self.meta["kwargs"], torch.device("cpu"), torch.float32)

    @torch.no_grad()
    def tail_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities after running float layers i.. on hidden states h."""
        kw = self.meta["kwargs"]
        for j in range(i, self.source.num_layers):
            layer = load_layer(self.model, self.source, j, "cpu", torch.float32)
            h = torch.cat([layer_output(layer(h[k:k + 4], **kw)) for k in range(0, len(h), 4)])
            release_layer(self.model, j)
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        return torch.log_softmax(self.model.lm_head(inner.norm(h)).float(), dim=-1)


def settings_for(method: str, overrides: dict, bits: int, group_size: int,
                 options: dict) -> QuantSettings:
    return QuantSettings(bits=bits, group_size=group_size, method=method,
                         calib=CalibSettings(samples=0)).replaced(**options, **overrides)


@torch.no_grad()
def run_variant(lab: Lab, i: int, name: str, bits: int, group_size: int, kl: bool,
                ref_logp=None) -> dict:
    from quantizer.methods.registry import get_method
    method, options, overrides = VARIANTS[name]
    overrides = dict(overrides)
    from quantizer.methods import token_weights as twm
    twm.OUTLIER_FACTOR = overrides.pop("outlier_factor", 4.0)  # lab-only knobs
    from quantizer.methods import awq as awq_mod
    from quantizer.methods.awq_clip import MASSIVE_PER_SAMPLE
    awq_mod.MASSIVE_PER_SAMPLE = overrides.pop("massive_per_sample", MASSIVE_PER_SAMPLE)
    settings = settings_for(method, overrides, bits, group_size, options)
    layer = load_layer(lab.model, lab.source, i, "cpu", torch.float32)
    _, held = lab.inputs(i)
    kw = lab.meta["kwargs"]
    y_ref = torch.cat([layer_output(layer(held[k:k + 4], **kw)) for k in range(0, len(held), 4)])
    ctx = lab.context(i, layer, settings)
    t0 = time.perf_counter()
    q = get_method(method, **options).quantize_layer(ctx)
    seconds = time.perf_counter() - t0
    for lin_name, qw in q.items():
        ctx.set_quantized(lin_name, qw)
    y = torch.cat([layer_output(layer(held[k:k + 4], **kw)) for k in range(0, len(held), 4)])
    release_layer(lab.model, i)
    norm = lab.next_norm(i)
    rec = {"layer": i, "variant": name, "seconds": round(seconds, 2),
           "delta": float((y - y_ref).norm() / (y_ref - held).norm()),
           "normed": float((norm(y) - norm(y_ref)).norm() / norm(y_ref).norm()),
           "out": float((y - y_ref).norm() / y_ref.norm())}
    # per-linear output error on the held-out tokens: captured inputs of the float layer
    if kl and ref_logp is not None:
        logp = lab.tail_logits(i + 1, y)
        rec["kl"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return rec


@torch.no_grad()
def activation_stats(lab: Lab, layers: list[int]) -> list[dict]:
    """Per layer and linear input group: max |x|, the channel holding it, mean |x| of the
    median channel, top mean / median mean, and how many tokens carry the max channel's
    extremes (|x| > 10 x that channel's median)."""
    from quantizer.methods.awq_clip import massive_tokens
    rows = []
    for i in layers:
        layer = load_layer(lab.model, lab.source, i, "cpu", torch.float32)
        calib, _ = lab.inputs(i)
        ctx = lab.context(i, layer, settings_for("rtn", {}, 4, 64, {}))
        names = [g[0] for g in ctx.arch.input_groups]
        per_sample = calib.shape[1]
        seen = {n: [] for n in names}
        for part in ctx.capture(names):
            for n in names:
                seen[n].append(part[n].reshape(-1, part[n].shape[-1]))
        for n in names:
            x = torch.cat(seen[n]).abs()
            mean = x.mean(0)
            amax, flat = x.max(), int(x.argmax())
            ch = flat % x.shape[1]
            col = x[:, ch]
            rows.append({"layer": i, "input_of": n, "max": float(amax), "channel": ch,
                         "median_channel_mean": float(mean.median()),
                         "top_mean_over_median": float(mean.max() / mean.median()),
                         "tokens_over_10x": int((col > 10 * col.median()).sum()),
                         # tokens AWQ's clip search adds to its sample (awq_clip)
                         "massive_tokens": int(massive_tokens(x, per_sample)[1].sum()),
                         "tokens": x.shape[0]})
        release_layer(lab.model, i)
    return rows


# Per-linear variants: (solver, scale search, grid max shrink, grid norm, token weights,
# symmetric, act_order, static_groups). Judged by the held-out output error of each linear
# alone, from held-out Hessians (no forward per variant).
LINEAR_VARIANTS: dict[str, tuple] = {
    "rtn": ("rtn", "minmax", 0.5, 2.0, False, False, False, False),
    "rtn-mse": ("rtn", "mse", 0.5, 2.0, False, False, False, False),
    "rtn-imx": ("rtn", "imatrix", 0.5, 2.0, False, False, False, False),
    "rtn-imx-n3": ("rtn", "imatrix", 0.5, 3.0, False, False, False, False),
    "rtn-imx-s95": ("rtn", "imatrix", 0.95, 2.0, False, False, False, False),
    "rtn-imx-tw": ("rtn", "imatrix", 0.5, 2.0, True, False, False, False),
    "rtn-imx-rf": ("rtn", "imatrix+refit", 0.5, 2.0, False, False, False, False),
    "rtn-imx-s95-rf": ("rtn", "imatrix+refit", 0.95, 2.0, False, False, False, False),
    "rtn-sym": ("rtn", "minmax", 0.5, 2.0, False, True, False, False),
    "rtn-sym-imx-rf": ("rtn", "imatrix+refit", 0.5, 2.0, False, True, False, False),
    "rtn-sym-imx": ("rtn", "imatrix", 0.5, 2.0, False, True, False, False),
    "gptq": ("gptq", "minmax", 0.5, 2.0, False, False, False, False),
    "gptq-imx": ("gptq", "imatrix", 0.5, 2.0, False, False, False, False),
    "gptq-tw": ("gptq", "minmax", 0.5, 2.0, True, False, False, False),
    "gptq-imx-tw": ("gptq", "imatrix", 0.5, 2.0, True, False, False, False),
    "gptq-as": ("gptq", "minmax", 0.5, 2.0, False, False, True, True),
    "gptq-as-imx": ("gptq", "imatrix", 0.5, 2.0, False, False, True, True),
    "gptq-as-imx-tw": ("gptq", "imatrix", 0.5, 2.0, True, False, True, True),
    "gptq-as-tw": ("gptq", "minmax", 0.5, 2.0, True, False, True, True),
    "gptq-sas": ("gptq", "minmax", 0.5, 2.0, False, True, True, True),
    "gptq-sas-imx": ("gptq", "imatrix", 0.5, 2.0, False, True, True, True),
    "gptq-sas-tw": ("gptq", "minmax", 0.5, 2.0, True, True, True, True),
    "gptq-sas-imx-tw": ("gptq", "imatrix", 0.5, 2.0, True, True, True, True),
    "gptq-a": ("gptq", "minmax", 0.5, 2.0, False, False, True, False),
    "gptq-imx-rf": ("gptq", "imatrix+refit", 0.5, 2.0, False, False, False, False),
    "gptq-as-imx-rf": ("gptq", "imatrix+refit", 0.5, 2.0, False, False, True, True),
    "gptq-sas-imx-rf": ("gptq", "imatrix+refit", 0.5, 2.0, False, True, True, True),
    "gptq-sas-mse": ("gptq", "mse", 0.5, 2.0, False, True, True, True),
    "gptq-a-imx-tw": ("gptq", "imatrix", 0.5, 2.0, True, False, True, False),
}


@torch.no_grad()
def linear_errors(lab: Lab, i: int, variants: list[str], bits: int, group_size: int
                  ) -> list[dict]:
    """Per linear and variant: relative output error on held-out tokens, plain (`ho`) and
    token-weighted (`ho_tw`, each token by 1 / mean(h²) of the residual after its block)."""
    from quantizer.methods.gptq import gptq_quantize, group_hessians
    from quantizer.methods.grid import GridSpec
    from quantizer.methods.rtn import rtn_quantize
    from quantizer.methods.token_weights import residual_token_weights
    layer = load_layer(lab.model, lab.source, i, "cpu", torch.float32)
    st = settings_for("rtn", {}, bits, group_size, {})
    ctx = lab.context(i, layer, st)
    calib, held = lab.inputs(i)
    hctx = lab.context(i, layer, st)
    hctx.inputs = [held[k:k + 4] for k in range(0, len(held), 4)]
    groups = list(ctx.arch.input_groups)
    tw_c, tw_h = residual_token_weights(ctx), residual_token_weights(hctx)
    H = {"c": group_hessians(ctx, groups), "cw": group_hessians(ctx, groups, token_weights=tw_c),
         "h": group_hessians(hctx, groups), "hw": group_hessians(hctx, groups, token_weights=tw_h)}
    rows = []
    for g in groups:
        for name in g:
            w = ctx.module(name).weight.data.float()
            for v in variants:
                solver, kind, shrink, norm, tw, sym, act, static = LINEAR_VARIANTS[v]
                spec = GridSpec(kind.split("+")[0], max_shrink=shrink, norm=norm,
                                refit=kind.endswith("+refit"))
                Hc = H["cw" if tw else "c"][g].H
                if solver == "rtn":
                    q = rtn_quantize(w, bits, group_size, sym, grid=spec,
                                     importance=torch.diagonal(Hc).clone())
                else:
                    q, _ = gptq_quantize(w, Hc, bits, group_size, sym, act, static,
                                         log=lambda m: None, grid=spec)
                d = q.dequantize(torch.float32) - w
                rec = {"layer": i, "linear": name, "variant": v}
                for key, Hh in (("ho", H["h"][g].H), ("ho_tw", H["hw"][g].H)):
                    rec[key] = float((((d @ Hh) * d).sum() / ((w @ Hh) * w).sum()).sqrt())
                rows.append(rec)
    release_layer(lab.model, i)
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(
            (f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "-")))
            for k in keys) + " |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Per variant: geometric mean over linears of its error / the first variant's error."""
    first = rows[0]["variant"]
    base = {(r["layer"], r["linear"]): r for r in rows if r["variant"] == first}
    out = ["| variant | ho / first (geo mean) | ho_tw / first | worst ho ratio |", "|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        ratios = [r["ho"] / base[(r["layer"], r["linear"])]["ho"] for r in rs]
        ratios_w = [r["ho_tw"] / base[(r["layer"], r["linear"])]["ho_tw"] for r in rs]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        geo_w = math.exp(sum(map(math.log, ratios_w)) / len(ratios_w))
        out.append(f"| {v} | {geo:.4f} | {geo_w:.4f} | {max(ratios):.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--model", default=None)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--calib", default="wikitext2-tail")
    c.add_argument("--samples", type=int, default=8)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--heldout-first", type=int, default=48)
    c.add_argument("--heldout", type=int, default=8)
    r = sub.add_parser("run")
    r.add_argument("--lab", type=Path, required=True)
    r.add_argument("--layers", default="all")
    r.add_argument("--variants", default="rtn,awq")
    r.add_argument("--bits", type=int, default=4)
    r.add_argument("--group-size", type=int, default=64)
    r.add_argument("--kl", action="store_true")
    r.add_argument("--json", type=Path, default=None, help="append records here")
    li = sub.add_parser("linears", help="per-linear held-out output errors of RTN / GPTQ "
                        "variants (LINEAR_VARIANTS)")
    li.add_argument("--lab", type=Path, required=True)
    li.add_argument("--layers", default="all")
    li.add_argument("--variants", default="rtn,rtn-imx,gptq")
    li.add_argument("--bits", type=int, default=4)
    li.add_argument("--group-size", type=int, default=64)
    li.add_argument("--json", type=Path, default=None, help="append records here")
    s = sub.add_parser("stats")
    s.add_argument("--lab", type=Path, required=True)
    s.add_argument("--layers", default="all")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.cmd == "capture":
        capture(Path(a.model) if a.model else default_model(), a.out, a.calib, a.samples,
                a.seqlen, a.heldout_first, a.heldout)
        return 0
    lab = Lab(a.lab)
    n = lab.source.num_layers
    layers = list(range(n)) if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    if a.cmd == "linears":
        rows = []
        for i in layers:
            part = linear_errors(lab, i, a.variants.split(","), a.bits, a.group_size)
            rows += part
            if a.json:
                with open(a.json, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in part)
            print(table(part, ["layer", "linear", "variant", "ho", "ho_tw"]), flush=True)
        print(summary(rows))
        return 0
    if a.cmd == "stats":
        rows = activation_stats(lab, layers)
        print(table(rows, ["layer", "input_of", "max", "channel", "median_channel_mean",
                           "top_mean_over_median", "tokens_over_10x", "massive_tokens"]))
        return 0
    rows = []
    for i in layers:
        ref_logp = None
        if a.kl:
            ref_logp = lab.tail_logits(i, lab.inputs(i)[1])
        for v in a.variants.split(","):
            rec = run_variant(lab, i, v, a.bits, a.group_size, a.kl, ref_logp)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    keys = ["layer", "variant", "delta", "normed", "out"] + (["kl"] if a.kl else []) + [
        "seconds"]
    print(table(rows, keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
