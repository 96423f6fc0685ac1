"""MoE end to end on generated tiny Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 checkpoints
(per-expert tensors on disk, as real checkpoints store them).

The references are transformers' own models, loaded with transformers' own conversion of the
per-expert names into its fused 3-D expert parameters: so these tests also prove that our
unfused experts compute what the fused ones do and that every exported name is the on-disk
name transformers (and vLLM) read."""
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from quantizer.errors import InputError
from quantizer import load, quantize
from quantizer.arch import get_arch
from quantizer.export import get_exporter
from quantizer.methods.awq_scales import fold_scales
from quantizer.methods.rtn import fake_quantize

from helpers import assert_same_tensors, load_tensors

PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-deepseek"]
QUANT_SUFFIX = {"awq": ".qweight", "gptq": ".qweight", "compressed-tensors": ".weight_packed"}


def hf_model(path):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, seed=0):
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dequantized_checkpoint(qdir, fmt, dest):
    """The export with every quantized linear replaced by its dequantized float weight and no
    quantization_config: a plain checkpoint transformers loads (and fuses) itself."""
    tensors = load_tensors(qdir)
    exporter = get_exporter(fmt)
    prefixes = [k[:-len(QUANT_SUFFIX[fmt])] for k in tensors if k.endswith(QUANT_SUFFIX[fmt])]
    assert prefixes, "no quantized linears in the export"
    packed = {k for p in prefixes for k in tensors if k.startswith(p + ".")
              and k != f"{p}.bias"}  # biases stay float tensors beside the packed weight
    out = {k: v.float() for k, v in tensors.items() if k not in packed}
    for p in prefixes:
        out[f"{p}.weight"] = exporter.linear_from_tensors(p, tensors).dequantize(torch.float32)
    dest.mkdir()
    save_file(out, str(dest / "model.safetensors"))
    cfg = json.loads((qdir / "config.json").read_text())
    cfg.pop("quantization_config")
    (dest / "config.json").write_text(json.dumps(cfg))
    return prefixes


@pytest.mark.parametrize("preset", PRESETS)
def test_unfused_experts_match_transformers_fused(preset, tiny_checkpoint):
    src = tiny_checkpoint(preset, dtype=torch.float32)
    ours = load(src)
    experts = ours.model.layers[1].mlp.experts
    assert type(experts).__name__ == "UnfusedExperts" and len(experts) == 4
    torch.testing.assert_close(logits(ours), logits(hf_model(src)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-mixtral",
                                    pytest.param("tiny-qwen3-moe", marks=pytest.mark.slow)])
def test_rtn_reload_matches_fake_quant(preset, tiny_checkpoint, tmp_path, prose_file):
    """RTN, every export layout: load() == transformers' fused model with every linear and
    every expert slice of the fused parameters fake-quantized (routers kept float). Each
    layout at its serving default: AWQ asymmetric, GPTQ and compressed-tensors symmetric."""
    src = tiny_checkpoint(preset, dtype=torch.float32)
    for fmt, symmetric in (("awq", False), ("gptq", True), ("compressed-tensors", True)):
        ref = hf_model(src)
        for name, mod in ref.named_modules():
            if ".layers." not in name:
                continue
            if isinstance(mod, torch.nn.Linear) and not name.endswith(("gate",
                                                                        "shared_expert_gate")):
                mod.weight.data = fake_quantize(mod.weight.data, 4, 32, symmetric)
            for pname in ("gate_up_proj", "down_proj"):  # fused (E, out, in) expert params
                p = getattr(mod, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    p.data = torch.stack([fake_quantize(w, 4, 32, symmetric) for w in p.data])
        out = tmp_path / fmt
        quantize(src, out, bits=4, group_size=32, method="rtn", export_format=fmt,
                 calib_samples=0, progress=False)
        assert json.loads((out / "config.json").read_text())["quantization_config"].get(
            "sym", symmetric) == symmetric
        assert rel(logits(load(out)), logits(ref)) < 5e-3, fmt


@pytest.mark.slow
@pytest.mark.parametrize("preset,method,fmt", [
    ("tiny-mixtral", "gptq", "gptq"), ("tiny-mixtral", "awq", "awq"),
    ("tiny-qwen3-moe", "gptq", "compressed-tensors"), ("tiny-qwen3-moe", "awq", "awq"),
    ("tiny-qwen2-moe", "awq", "gptq"), ("tiny-deepseek", "gptq", "compressed-tensors"),
    ("tiny-deepseek", "awq", "awq")])
def test_calibrated_reload_matches_dequantized_reference(preset, method, fmt, tiny_checkpoint,
                                                         tmp_path, prose_file):
    src = tiny_checkpoint(preset, dtype=torch.float32)
    out = tmp_path / "q"
    result = quantize(src, out, bits=4, group_size=32, method=method, export_format=fmt,
                      calib_data=str(prose_file), calib_samples=4, calib_seqlen=32,
                      progress=False, min_expert_tokens=1)
    prefixes = dequantized_checkpoint(out, fmt, tmp_path / "deq")
    arch = get_arch(json.loads((src / "config.json").read_text()))
    moe = arch.moe
    # every routed expert's three linears are quantized under their on-disk names
    for e in range(4):
        for k in range(3):
            assert f"model.layers.1.{moe.expert(e, k)}" in prefixes
    assert not any(p.endswith((f".{moe.router}", "shared_expert_gate")) for p in prefixes)
    got = logits(load(out))
    assert rel(got, logits(hf_model(tmp_path / "deq"))) < 5e-3
    # the quantized model stays close to the float one
    assert rel(got, logits(hf_model(src))) < 0.3
    moe_layer = result.layers[1].stats
    assert sum(v for k, v in moe_layer.items() if k.startswith("expert_tokens.")) == 4 * 32 * 2


@pytest.mark.slow
def test_gptq_beats_rtn_on_moe_layers(tiny_checkpoint, tmp_path, prose_file):
    src = tiny_checkpoint("tiny-mixtral", dtype=torch.float32)
    errs = {}
    for method in ("rtn", "gptq"):  # 4-bit: vLLM's fused-MoE kernels take int4 / int8 only
        r = quantize(src, tmp_path / method, bits=4, group_size=32, method=method,
                     calib_data=str(prose_file), calib_samples=4, calib_seqlen=32,
                     progress=False, export_format="gptq", min_expert_tokens=1)
        errs[method] = [layer.output_error for layer in r.layers]
    assert all(g < 0.8 * r for g, r in zip(errs["gptq"], errs["rtn"])), errs


@pytest.mark.parametrize("preset", PRESETS)
def test_every_scale_group_fold_preserves_the_layer(preset, tiny_checkpoint):
    """AWQ folds s into a group's `prev` and multiplies its linears (and the fold-only modules:
    router, shared-expert gate, fallback experts) by s: exact in real arithmetic, so the MoE
    layer's output -- routing included -- must not change. Leaving the router out changes
    which experts tokens go to, and this fails."""
    from quantizer.stream.skeleton import build_skeleton, load_layer, layer_output
    from quantizer.stream.source import CheckpointSource

    source = CheckpointSource(tiny_checkpoint(preset, dtype=torch.float32))
    model = build_skeleton(source, "cpu", torch.float32)
    layer = load_layer(model, source, 1, "cpu", torch.float32)
    x = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).expand(2, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "position_ids": pos}
    before = layer_output(layer(x, **kwargs))
    spec = source.arch.for_layer(model.config, 1, rtn_experts=(2,))
    gen = torch.Generator().manual_seed(2)
    from quantizer.methods.awq_scales import fold_shape_problem
    for g in spec.scale_groups:
        if fold_shape_problem(layer, g.prev, g.linears + g.also_scale):
            continue  # v -> o under GQA (v narrower than o's input): AWQ skips it too
        width = layer.get_submodule(g.linears[0]).weight.shape[1]
        s = torch.rand(width, generator=gen) * 1.5 + 0.5
        fold_scales(layer, g.prev, g.linears + g.also_scale, s, spec.fold_kind(g.prev))
    torch.testing.assert_close(layer_output(layer(x, **kwargs)), before, rtol=1e-4, atol=1e-5)


def test_layer_specs_name_dense_and_moe_layers():
    from quantizer.demo.synthetic import PRESETS as P, make_config
    params = dict(P["tiny-deepseek"])
    cfg = make_config(params.pop("model_type"), **params)
    arch = get_arch(cfg.to_dict())
    dense, sparse = arch.for_layer(cfg, 0), arch.for_layer(cfg, 1)
    assert "mlp.gate_proj" in dense.linears and "self_attn.kv_b_proj" in dense.linears
    assert "mlp.experts.3.down_proj" in sparse.linears and "mlp.gate_proj" not in sparse.linears
    assert ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj") in sparse.input_groups
    skipped = arch.for_layer(cfg, 1, rtn_experts=(3,))
    assert "mlp.experts.3.down_proj" not in skipped.linears
    norm = next(g for g in skipped.scale_groups if g.prev == "post_attention_layernorm")
    assert {"mlp.gate", "mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"} <= set(
        norm.also_scale)
    assert arch.representative_layers(cfg) == (0, 1)


@pytest.mark.slow
def test_gptq_expert_batches_equal_one_group_per_forward(tiny_checkpoint, tmp_path, prose_file,
                                                         monkeypatch):
    """Experts' groups captured together (their inputs do not depend on each other) give
    byte-identical exports to the true-sequential one-group-per-forward order."""
    import quantizer.arch.base as arch_base

    src = tiny_checkpoint("tiny-qwen3-moe", dtype=torch.float32)
    spec = get_arch(json.loads((src / "config.json").read_text())).for_layer(None, 1)
    batches = spec.capture_batches(lambda n: 128 if "down" not in n else 64)
    assert [len(b) for b in batches] == [1, 1, 4, 4]  # qkv, o, 4 x gate/up, 4 x down
    assert len(spec.capture_batches(lambda n: 128, max_bytes=4 * 128 ** 2 * 2)) == 2 + 2 + 2
    exports = []
    for cap in (1, 1 << 30):
        monkeypatch.setattr(arch_base, "EXPERT_BATCH_HESSIAN_BYTES", cap)
        out = tmp_path / f"cap{cap}"
        quantize(src, out, bits=4, group_size=32, method="gptq", export_format="gptq",
                 calib_data=str(prose_file), calib_samples=4, calib_seqlen=32, progress=False,
                 min_expert_tokens=1)
        exports.append(load_tensors(out))
    assert_same_tensors(exports[0], exports[1])


@pytest.mark.slow
def test_awq_expert_batches_equal_one_group_per_forward(tiny_checkpoint, tmp_path, prose_file,
                                                        monkeypatch):
    """AWQ's expert up -> down groups captured together give byte-identical exports to one
    capture forward per group, and take fewer forwards."""
    from quantizer.arch.base import ArchSpec

    src = tiny_checkpoint("tiny-qwen3-moe", dtype=torch.float32)
    spec = get_arch(json.loads((src / "config.json").read_text())).for_layer(None, 1)
    sizes = [len(b) for b in spec.scale_batches(torch.tensor([10, 10, 10, 10]), 30)]
    assert sizes == [1, 1, 1, 3, 1]  # qkv, v -> o, experts' gate/up, then 3 + 1 up -> down
    assert [len(b) for b in spec.scale_batches(None, 30)] == [1] * 7
    real = ArchSpec.scale_batches
    calls = {}
    exports = []
    for mode in ("single", "batched"):
        def batches(self, tokens, cap, mode=mode):
            out = real(self, tokens, cap)
            out = out if mode == "batched" else [[g] for b in out for g in b]
            calls[mode] = calls.get(mode, 0) + len(out)
            return out
        monkeypatch.setattr(ArchSpec, "scale_batches", batches)
        out = tmp_path / mode
        quantize(src, out, bits=4, group_size=32, method="awq", calib_data=str(prose_file),
                 calib_samples=4, calib_seqlen=32, progress=False, min_expert_tokens=1)
        exports.append(load_tensors(out))
    assert_same_tensors(exports[0], exports[1])
    assert calls["batched"] < calls["single"]  # batches, not one capture per expert


@pytest.mark.slow
@pytest.mark.serving_errors_expected  # the --engine none export, on purpose
def test_adaptive_bits_on_moe_serve_or_go_per_expert(tiny_checkpoint, tmp_path, prose_file,
                                                     request):
    """Fractional --bits on a MoE model. For vLLM (the default) every expert of a layer
    shares one setting -- its fused-MoE layer loads one scheme, looked up under expert 0's
    gate_proj/up_proj/down_proj -- experts are int4/int8, and a target that cannot be met so
    is refused naming the smallest that can. --engine none gives every expert its own width
    (compressed-tensors config names them; vLLM refuses that). Both reload and match their
    dequantized form as transformers loads it."""
    from quantizer.export.serving import _ct_declared
    from quantizer.validate.loader import quant_spec

    src = tiny_checkpoint("tiny-mixtral", dtype=torch.float32)
    kw = dict(group_size=32, method="gptq", calib_data=str(prose_file), calib_samples=4,
              calib_seqlen=32, progress=False, min_expert_tokens=1)
    out = tmp_path / "q"
    result = quantize(src, out, bits=4.75, **kw)
    alloc = result.extra["bit_allocation"]
    assert alloc["achieved_bpw"] <= 4.75 and abs(alloc["achieved_bpw"] - 4.75) < 0.1
    assert alloc["tied_moe_layers"] == 2 and alloc["vllm_candidates_only"]
    assert not request.node.serving_reports[-1].errors
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = quant_spec({"quantization_config": qcfg})
    for i in range(2):
        block = f"model.layers.{i}.block_sparse_moe.experts"
        settings = {(spec.for_module(f"{block}.{e}.{n}").bits,
                     spec.for_module(f"{block}.{e}.{n}").group_size)
                    for e in range(4) for n in ("w1", "w2", "w3")}
        assert len(settings) == 1 and next(iter(settings))[0] in (4, 8), settings
        looked_up = {_ct_declared(qcfg, f"{block}.0.{p}").scheme
                     for p in ("gate_proj", "up_proj", "down_proj")}
        assert len(looked_up) == 1 and None not in looked_up  # vLLM's names resolve
    dequantized_checkpoint(out, "compressed-tensors", tmp_path / "deq")
    assert rel(logits(load(out)), logits(hf_model(tmp_path / "deq"))) < 5e-3

    measurement = out / "measurement.json"
    with pytest.raises(InputError, match=r"smallest servable target is \d\.\d+ bpw"):
        quantize(src, tmp_path / "low", bits=3.5, measurement=measurement, **kw)
    assert not (tmp_path / "low").exists()

    free = tmp_path / "free"
    result = quantize(src, free, bits=3.5, measurement=measurement, engine="none", **kw)
    assert abs(result.extra["bit_allocation"]["achieved_bpw"] - 3.5) < 0.05
    spec = quant_spec(json.loads((free / "config.json").read_text()))
    widths = {spec.for_module(f"model.layers.{i}.block_sparse_moe.experts.{e}.{n}").bits
              for i in range(2) for e in range(4) for n in ("w1", "w2", "w3")}
    assert len(widths) > 1  # experts differ
    assert request.node.serving_reports[-1].errors  # ... which vLLM refuses
    dequantized_checkpoint(free, "compressed-tensors", tmp_path / "deq2")
    assert rel(logits(load(free)), logits(hf_model(tmp_path / "deq2"))) < 5e-3
