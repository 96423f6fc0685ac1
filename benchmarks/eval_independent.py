"""One evaluation harness for every export, ours and the peer's, that uses none of layerquant's
code: each quantized format is dequantized from its public specification, the dequantized
weights are loaded into plain transformers, and perplexity on the first W x L tokens of
WikiText-2 test (CRLF normalised) and the mean next-token KL to the float model are computed.

Formats (what the files say, not what we write):
- AutoAWQ GEMM (`quant_method: awq`, version gemm): qweight int32 (in, out/8), nibble k of a
  word = output column [0, 2, 4, 6, 1, 3, 5, 7][k] of its 8; qzeros (in/g, out/8) the same;
  scales (in/g, out). w[o, i] = (q - z) * s.
- GPTQ (`quant_method: gptq`): qweight int32 (in*bits/32, out), consecutive input rows in
  consecutive `bits`-wide fields (little end first, fields may straddle words for 3 bits);
  qzeros (groups, out*bits/32) the same along output columns, stored minus one when
  `checkpoint_format` is gptq (v1); scales (groups, out); g_idx (in) optional, default i // g.
- compressed-tensors `pack-quantized`: weight_packed int32 (out, in*bits/32) along input,
  values stored as signed + 2^(bits-1); weight_zero_point (out*bits/32, groups) packed along
  output the same way (asymmetric only); weight_scale (out, groups); weight_g_idx optional;
  config groups matched by `targets` (class `Linear` or `re:` regex with re.match) minus
  `ignore`.

    python benchmarks/eval_independent.py --base BASE_DIR --wikitext wiki.test.raw \\
        --out results.json NAME=EXPORT_DIR [NAME=EXPORT_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

AWQ_COLUMN_OF_NIBBLE = (0, 2, 4, 6, 1, 3, 5, 7)


# ---------------------------------------------------------------- bit fields
def unpack_fields(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """int32 words -> `count` unsigned `bits`-wide fields along `dim`, little end first; a
    field may straddle two words (3-bit), so each is read from a word and its successor."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    start = torch.arange(count, device=w.device) * bits
    word, off = start // 32, start % 32
    pair = w[..., word] | (w[..., word + 1] << 32)
    return ((pair >> off) & ((1 << bits) - 1)).movedim(-1, dim)


def dequant_awq(t: dict, group: int) -> torch.Tensor:
    qw, qz, s = t["qweight"], t["qzeros"], t["scales"].float()
    in_f, out_f = qw.shape[0], qw.shape[1] * 8
    q = torch.empty(in_f, out_f, dtype=torch.int64)
    z = torch.empty(qz.shape[0], out_f, dtype=torch.int64)
    w64, z64 = qw.to(torch.int64) & 0xFFFFFFFF, qz.to(torch.int64) & 0xFFFFFFFF
    for k, col in enumerate(AWQ_COLUMN_OF_NIBBLE):
        q[:, col::8] = (w64 >> (4 * k)) & 0xF
        z[:, col::8] = (z64 >> (4 * k)) & 0xF
    g = torch.arange(in_f) // (group if group > 0 else in_f)
    return ((q - z[g]).float() * s[g]).t().contiguous()


def dequant_gptq(t: dict, bits: int, group: int, v1: bool) -> torch.Tensor:
    s = t["scales"].float()
    out_f = s.shape[1]
    in_f = t["qweight"].shape[0] * 32 // bits
    q = unpack_fields(t["qweight"], bits, in_f, dim=0)
    z = unpack_fields(t["qzeros"], bits, out_f, dim=1) + (1 if v1 else 0)
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(in_f) // (
        group if group > 0 else in_f)
    return ((q - z[g]).float() * s[g]).t().contiguous()


def dequant_ct(t: dict, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
    offset = 1 << (bits - 1)
    q = unpack_fields(t["weight_packed"], bits, in_f, dim=1) - offset
    s = t["weight_scale"].float()
    n_groups = s.shape[1]
    z = (unpack_fields(t["weight_zero_point"], bits, out_f, dim=0) - offset
         if not symmetric else torch.zeros(out_f, n_groups, dtype=torch.int64))
    g = t["weight_g_idx"].long() if "weight_g_idx" in t else torch.arange(in_f) // (
        group if group > 0 else in_f)
    return (q - z[:, g]).float() * s[:, g]


# ---------------------------------------------------------------- checkpoints
def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _ct_scheme(qc: dict, module: str) -> dict | None:
    if any(module == i or (i.startswith("re:") and re.match(i[3:], module))
           for i in qc.get("ignore", [])):
        return None
    for grp in qc["config_groups"].values():
        for target in grp["targets"]:
            if target == "Linear" or (target.startswith("re:") and re.match(target[3:], module)) \
                    or target == module:
                return grp["weights"]
    return None


def dequantized_state(folder: Path) -> tuple[dict, dict]:
    """(config without quantization_config, float state dict) of an export or float model."""
    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config", None)
    tensors = read_tensors(folder)
    if qc is None:
        return config, tensors
    method = qc["quant_method"]
    suffixes = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales",
                                                                  "g_idx"),
                "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point",
                                       "weight_shape", "weight_g_idx")}[method]
    modules: dict[str, dict] = {}
    state = {}
    for name, t in tensors.items():
        mod, _, leaf = name.rpartition(".")
        if leaf in suffixes:
            modules.setdefault(mod, {})[leaf] = t
        else:
            state[name] = t
    for mod, t in modules.items():
        if method == "awq":
            w = dequant_awq(t, int(qc["group_size"]))
        elif method == "gptq":
            w = dequant_gptq(t, int(qc["bits"]), int(qc["group_size"]),
                             v1=qc.get("checkpoint_format", "gptq") == "gptq")
        else:
            scheme = _ct_scheme(qc, mod)
            if scheme is None:
                raise SystemExit(f"{folder}: {mod} is packed but no config group targets it")
            w = dequant_ct(t, int(scheme["num_bits"]), int(scheme.get("group_size") or -1),
                           bool(scheme["symmetric"]))
        state[f"{mod}.weight"] = w
    return config, state


def build_model(config: dict, state: dict, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config)
    # Built for real (not on the meta device), so buffers that checkpoints do not hold
    # (rotary tables) are the model's own.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tied = getattr(cfg, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SystemExit(f"state does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(dtype))
    if tied:
        model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- evaluation
def eval_windows(base: Path, wikitext: Path, windows: int, seqlen: int) -> torch.Tensor:
    from transformers import AutoTokenizer
    text = wikitext.read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = AutoTokenizer.from_pretrained(str(base))(text, add_special_tokens=False)["input_ids"]
    need = windows * seqlen
    if len(ids) < need:
        raise SystemExit(f"{wikitext} has {len(ids)} tokens, fewer than {need}")
    return torch.tensor(ids[:need]).reshape(windows, seqlen)


@torch.no_grad()
def evaluate(model, ref, tokens: torch.Tensor, device: str) -> dict:
    nll, kl, n = 0.0, 0.0, 0
    for row in tokens:
        x = row.unsqueeze(0).to(device)
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
        target = x[0, 1:]
        nll -= float(logp.gather(1, target[:, None]).sum())
        if ref is not None:
            ref_logp = torch.log_softmax(ref(x).logits[0, :-1].float(), dim=-1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        n += target.numel()
    return {"ppl": math.exp(nll / n), "kl": kl / n if ref is not None else 0.0, "tokens": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--base", required=True, type=Path, help="the float model")
    p.add_argument("--wikitext", required=True, type=Path, help="wiki.test.raw")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("exports", nargs="*", help="NAME=DIR")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    tokens = eval_windows(a.base, a.wikitext, a.windows, a.seqlen)
    ref = build_model(*dequantized_state(a.base), dtype, a.device)
    rows = {"fp": {**evaluate(ref, None, tokens, a.device), "dir": str(a.base)}}
    for spec in a.exports:
        name, _, folder = spec.partition("=")
        t0 = time.perf_counter()
        model = build_model(*dequantized_state(Path(folder)), dtype, a.device)
        rows[name] = {**evaluate(model, ref, tokens, a.device), "dir": folder,
                      "seconds": round(time.perf_counter() - t0, 1)}
        del model
        print(f"{name}: ppl {rows[name]['ppl']:.3f} KL {rows[name]['kl']:.4f}", flush=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
           "protocol": f"WikiText-2 test, first {a.windows} x {a.seqlen} tokens, {a.dtype}",
           "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
