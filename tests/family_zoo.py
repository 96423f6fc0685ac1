"""The family zoo: every model family of transformers' causal-LM and image-text-to-text
mappings, as a tiny random checkpoint written by transformers itself, through
quantize (RTN, GPTQ, AWQ where scale groups exist) -> quantizer.load() -> logits against
transformers' own model loaded from the export's dequantized weights; the export's tensor
names against the source checkpoint's; every AWQ fold of every layer kind applied alone to
the float layer, whose output must not change.

A family either passes every check or is refused before any work with one line saying what
is missing; anything else is a failure of the zoo. Used by tests/test_family_zoo.py, and as a
script for the whole table:

    PYTHONPATH=$PWD python tests/family_zoo.py --out benchmarks/results/family_zoo.json
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from helpers import CALIB_FILE as CALIB, load_tensors
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed",
                  ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")
FORMATS = {"rtn": "awq", "gptq": "gptq", "awq": "awq"}
# Zoo entries beside transformers' mappings: name -> (model type, tiny-config overrides,
# config.json overrides). Kimi-K2 publishes DeepSeek-V3's architecture as "kimi_k2"; Gemma 4
# sizes without per-layer token inputs are quantized like any family.
VARIANTS = {
    "kimi_k2": ("deepseek_v3", {}, {"model_type": "kimi_k2"}),
    "gemma4_text(no per-layer inputs)": ("gemma4_text", {"hidden_size_per_layer_input": 0},
                                         {}),
}
LOGIT_TOLERANCE = 2e-3
FOLD_TOLERANCE = 1e-4


@dataclass
class ZooResult:
    family: str
    supported: bool
    why: str = ""
    seconds: float = 0.0
    methods: list[str] = field(default_factory=list)
    logit_error: dict = field(default_factory=dict)  # method -> relative logit difference
    quantized: int = 0  # quantized linears in the export (last method)
    folds: dict = field(default_factory=dict)  # exact / skipped (with reasons)
    failure: str = ""  # set when a check failed (a bug, not a refusal)


def check_names(src: Path, out: Path) -> int:
    """Every tensor of the export is the source's (same name) or a quantized linear's part
    whose float weight the source has under that prefix; nothing of the source is dropped.
    Returns the number of quantized linears."""
    source, export = set(load_tensors(src)), set(load_tensors(out))
    quantized = {n.rsplit(".", 1)[0] for n in export if n.endswith(QUANT_SUFFIXES)}
    for prefix in quantized:
        assert f"{prefix}.weight" in source, f"quantized {prefix} has no source weight"
    plain = {n for n in export if not n.endswith(QUANT_SUFFIXES)}
    strange = plain - source
    assert not strange, f"export names not in the source: {sorted(strange)[:4]}"
    dropped = {n for n in source - plain if n.rsplit(".", 1)[0] not in quantized}
    assert not dropped, f"source tensors missing from the export: {sorted(dropped)[:4]}"
    return len(quantized)


def dequantized(out: Path, fmt: str, dest: Path) -> Path:
    """The export with each quantized linear as its dequantized float weight, no
    quantization_config: a plain checkpoint transformers loads with its own name rules."""
    from safetensors.torch import save_file

    from quantizer.export import get_exporter

    tensors = load_tensors(out)
    exporter = get_exporter(fmt)
    head = ".qweight" if fmt in ("awq", "gptq") else ".weight_packed"
    prefixes = [k[:-len(head)] for k in tensors if k.endswith(head)]
    drop = {k for p in prefixes for k in tensors if k.startswith(p + ".")
            and k.endswith(QUANT_SUFFIXES)}
    plain = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()
             if k not in drop}
    for p in prefixes:
        plain[f"{p}.weight"] = exporter.linear_from_tensors(p, tensors).dequantize(torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(plain, str(dest / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def reference_model(path: Path):
    """transformers' own model from `path`; fails on any missing or unexpected tensor."""
    from quantizer.arch.meta import config_from_dict, model_class

    cfg = config_from_dict(json.loads((path / "config.json").read_text()))
    cls = model_class(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(path, config=cfg, dtype=torch.float32,
                                          output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                  "mismatched_keys") and v}
    bad.get("missing_keys", set())
    missing = [k for k in bad.get("missing_keys", []) if not k.endswith("inv_freq")]
    assert not missing and not bad.get("unexpected_keys") and not bad.get("mismatched_keys"), \
        f"transformers loads the export with {bad}"
    return model.eval()


@torch.no_grad()
def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=ids, use_cache=False)
    return out.logits.float()


def check_logits(out: Path, fmt: str, work: Path) -> float:
    """quantizer.load(export) against transformers' model of the dequantized export."""
    from quantizer import load
    from quantizer.stream.source import CheckpointSource

    vocab = int(CheckpointSource(out).arch.text.vocab_size)
    ours = logits(load(out), vocab)
    ref = logits(reference_model(dequantized(out, fmt, work / "deq")), vocab)
    err = float((ours - ref).norm() / ref.norm())
    assert err < LOGIT_TOLERANCE, f"load() logits differ from transformers' by {err:.2e}"
    return err


@torch.no_grad()
def check_folds(src: Path) -> dict:
    """Each AWQ scale group of each layer kind, folded alone with random scales into a copy
    of the float layer: exact where the probe calls it exact, skipped with a reason else."""
    from quantizer.arch.folds import fold_problem
    from quantizer.settings import QuantSettings
    from quantizer.methods.context import LayerContext
    from quantizer.validate.loader import LayerLoader
    from quantizer.methods.awq_scales import fold_scales, fold_shape_problem
    from quantizer.stream.skeleton import capture_layer_inputs, kwargs_to_device, layer_output

    loader = LayerLoader(src, torch.float32)
    arch = loader.source.arch
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    hidden, calls = capture_layer_inputs(loader.model, ids)
    calls = kwargs_to_device(calls, "cpu", torch.float32)
    exact, skipped = [], {}
    for kind in arch.kinds:
        i = kind.index
        layer = loader.load(i)
        spec = arch.for_layer(None, i)
        x = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
        ctx = LayerContext(i, layer, spec, loader.model.config, QuantSettings(bits=4), [x],
                           calls[i], torch.device("cpu"), torch.float32)
        ref = layer_output(layer(x, **calls[i]))
        for g in spec.scale_groups:
            label = f"{g.prev}->{','.join(g.linears[:3])}"
            why = fold_shape_problem(layer, g.prev, g.linears + g.also_scale)
            why = why or (None if spec.fold_kind(g.prev) else f"{g.prev} takes no fold")
            why = why or fold_problem(ctx, g)
            if why:
                skipped[label] = why
                continue
            folded = copy.deepcopy(layer)
            width = folded.get_submodule(g.linears[0]).in_features
            s = torch.exp(0.5 * torch.randn(width, generator=torch.Generator().manual_seed(3)))
            fold_scales(folded, g.prev, g.linears + g.also_scale, s, spec.fold_kind(g.prev))
            out = layer_output(folded(x, **calls[i]))
            err = float((out - ref).norm() / ref.norm())
            assert err < FOLD_TOLERANCE, f"fold {label} changes layer {i}'s output by {err:.2e}"
            exact.append(label)
        loader.release(i)
    return {"exact": exact, "skipped": skipped}


def run_family(family: str, work: Path, methods=("rtn", "gptq", "awq"),
               keep: bool = False) -> ZooResult:
    from quantizer import quantize
    from quantizer.arch.tiny import write_tiny
    from quantizer.errors import InputError
    from quantizer.stream.source import CheckpointSource

    t0 = time.perf_counter()
    res = ZooResult(family, False)
    base = work / "".join(c if c.isalnum() or c in "_-" else "_" for c in family)
    shutil.rmtree(base, ignore_errors=True)
    model_type, overrides, config_json = VARIANTS.get(family, (family, {}, {}))
    try:
        src = write_tiny(model_type, base / "src", overrides=overrides, config_json=config_json)
    except InputError as e:
        res.why = str(e) if "tiny" in str(e) else f"the tiny config does not build: {e}"
        return res
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 -- transformers cannot build or save it
        res.why = f"the tiny {family} checkpoint cannot be made: {type(e).__name__}: " \
                  f"{str(e).splitlines()[0][:120] if str(e) else ''}"
        return res
    try:
        arch = CheckpointSource(src).arch  # the refusal, before any work
    except InputError as e:
        res.why = str(e)
        return res
    try:
        has_groups = any(arch.for_layer(None, k.index).scale_groups for k in arch.kinds)
        for method in methods:
            if method == "awq" and not has_groups:
                continue
            out = base / method
            opts = {"grid": 4, "clip_grid": 4, "clip_tokens": 64} if method == "awq" else {}
            quantize(str(src), str(out), bits=4, group_size=32, method=method,
                     export_format=FORMATS[method], calib_data=str(CALIB), calib_samples=4,
                     calib_seqlen=32, progress=False, min_expert_tokens=1, device="cpu",
                     overwrite=True, **opts)
            res.quantized = check_names(src, out)
            res.logit_error[method] = check_logits(out, FORMATS[method], base / f"{method}-ref")
            res.methods.append(method)
        res.folds = check_folds(src)
        res.supported = True
        res.why = f"{len(arch.kinds)} layer kind(s)" + (", MoE" if arch.moe else "") + (
            f", kept {', '.join(arch.kept_modules)}" if arch.kept_modules else "")
    except InputError as e:
        if not res.methods and not (base / methods[0]).exists():
            res.why = str(e)  # quantize's own checks, before any work: a refusal
        else:
            res.failure = f"refused after discovery: {e}"
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 -- a failed check: reported in full
        res.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        res.failure += " @ " + " < ".join(
            f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
            for f in traceback.extract_tb(e.__traceback__)[-3:])
    finally:
        res.seconds = round(time.perf_counter() - t0, 1)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return res


def table(results: list[ZooResult]) -> str:
    rows = ["| family | supported | why |", "|---|---|---|"]
    for r in results:
        ok = "yes" if r.supported and not r.failure else ("FAILED" if r.failure else "no")
        why = r.failure or r.why
        rows.append(f"| {r.family} | {ok} | {why.replace('|', '/')} |")
    passing = [r.family for r in results if r.supported and not r.failure]
    vlm = [f for f in passing if _is_vlm(f)]
    failed = sum(bool(r.failure) for r in results)
    rows.append(f"\n{len(passing)} of {len(results)} families pass ({len(passing) - len(vlm)} "
                f"text, {len(vlm)} vision-language text decoders); {failed} fail a check; the "
                f"rest are refused before any work with the reason given")
    return "\n".join(rows)


def _is_vlm(family: str) -> bool:
    """An image-text-to-text family (its text decoder is what the zoo quantizes)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return VARIANTS.get(family, (family,))[0] in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def main(argv=None) -> int:
    import logging

    import transformers

    from quantizer.arch.tiny import all_families

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    p = argparse.ArgumentParser(description="run the family zoo")
    p.add_argument("--families", nargs="*", help="default: every family transformers maps")
    p.add_argument("--work", type=Path, default=Path("/tmp/layerquant-zoo"))
    p.add_argument("--out", type=Path, help="JSON results (a .md table beside it)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--family-timeout", type=int, default=180,
                   help="seconds one family may take before it is reported as a failure")
    p.add_argument("--first", nargs="*", default=[],
                   help="families to run before the rest (the rest in transformers' order)")
    a = p.parse_args(argv)
    families = a.families or all_families() + list(VARIANTS)
    families = [f for f in a.first if f in families] + [f for f in families
                                                         if f not in a.first]
    results = []
    for fam in families:
        r = _run_with_timeout(fam, a.work, a.keep, a.family_timeout)
        results.append(r)
        state = "ok" if r.supported and not r.failure else ("FAIL" if r.failure else "refused")
        print(f"{fam:28s} {state:8s} {r.seconds:6.1f}s {r.failure or r.why}", flush=True)
        if a.out:  # after every family: a stopped run keeps what it did
            _write(results, a.out, "PYTHONPATH=$PWD python " + " ".join(sys.argv))
    print(table(results))
    return 0


def _run_with_timeout(fam: str, work: Path, keep: bool, seconds: int) -> ZooResult:
    import signal

    def stop(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        return run_family(fam, work, keep=keep)
    except TimeoutError as e:  # raised outside run_family's own checks (building the model)
        shutil.rmtree(work, ignore_errors=True)
        return ZooResult(fam, False, failure=str(e), seconds=round(time.perf_counter() - t0, 1))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _write(results: list[ZooResult], out: Path, command: str) -> None:
    out.write_text(json.dumps({"command": command, "results": [asdict(r) for r in results]},
                              indent=1))
    out.with_suffix(".md").write_text(f"Made by: `{command}`\n\n" + table(results) + "\n")


if __name__ == "__main__":
    sys.exit(main())
