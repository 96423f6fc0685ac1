"""AWQ method on tiny random decoder layers of each supported family (CPU, float32 unless
stated): scale folding, α choice, GQA skipping, quality vs RTN, fp16/bf16, determinism."""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from quantizer.arch import get_arch
from quantizer.settings import QuantSettings
from quantizer.methods.context import LayerContext
from quantizer.methods.awq import AWQ
from quantizer.methods.registry import get_method
from quantizer.methods.awq_scales import (candidate_scales, fold_overflows, fold_scales,
                                         grid_search)
from quantizer.methods.awq_clip import fake_quantize_float, search_clip, shrink_ratios
from quantizer.methods.rtn import RTN, fake_quantize

from helpers import assert_same_tensors

transformers = pytest.importorskip("transformers")

# family -> (transformers module, class-name prefix, extra config)
FAMILIES = {"llama": ("llama", "Llama", {}), "mistral": ("mistral", "Mistral", {}),
            "qwen2": ("qwen2", "Qwen2", {}), "qwen3": ("qwen3", "Qwen3", {"head_dim": 16})}


def family_classes(family: str):
    mod, prefix, _ = FAMILIES[family]
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    c = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    return (getattr(c, f"{prefix}Config"), getattr(m, f"{prefix}DecoderLayer"),
            getattr(m, f"{prefix}RotaryEmbedding"))


HIDDEN, INTER, SEQ, CHUNKS = 64, 128, 16, 3
SMALL = dict(grid=10, clip_grid=10, clip_tokens=64)  # coarser grids keep the file fast


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: thread start-up and contention on a shared CPU cost 10x the arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(kv_heads: int = 4, family: str = "llama"):
    config_cls = family_classes(family)[0]
    cfg = config_cls(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4,
                     num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=32,
                     max_position_embeddings=64, **FAMILIES[family][2])
    cfg._attn_implementation = "sdpa"
    return cfg


def make_layer(cfg, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    layer_cls = family_classes(cfg.model_type)[1]
    layer = layer_cls(cfg, layer_idx=0).eval().requires_grad_(False)
    for name, p in layer.named_parameters():
        if p.dim() == 2:
            p.normal_(0, 0.05)
        elif name.endswith("bias"):  # qwen2's q/k/v biases
            p.normal_(0, 0.1)
        else:  # norms: around 1, not exactly, so folding is visible
            p.uniform_(0.5, 1.5)
    return layer.to(dtype)


def make_inputs(seed: int, outliers: bool, flat: bool = False, dtype=torch.float32,
                outlier_scale: float = 40.0):
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for _ in range(CHUNKS):
        if flat:  # every channel the same magnitude: |x| = 1 everywhere
            x = torch.randint(0, 2, (2, SEQ, HIDDEN), generator=gen).float() * 2 - 1
        else:
            x = torch.randn(2, SEQ, HIDDEN, generator=gen)
        if outliers:
            x[..., [3, 17, 40]] *= outlier_scale
        chunks.append(x.to(dtype))
    return chunks


def make_ctx(layer, cfg, inputs, settings=None, dtype=torch.float32):
    rotary = family_classes(cfg.model_type)[2](config=cfg)
    pos = torch.arange(SEQ).unsqueeze(0)
    cos, sin = rotary(inputs[0], pos)
    kwargs = {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "attention_mask": None,
              "position_ids": pos}
    settings = settings or QuantSettings(bits=4, group_size=32)
    return LayerContext(index=0, layer=layer, arch=get_arch(cfg.to_dict()).for_layer(cfg, 0),
                        model_config=cfg,
                        settings=settings, inputs=inputs, layer_kwargs=kwargs,
                        device=torch.device("cpu"), dtype=dtype)


def groups(ctx) -> list[dict]:
    return list(ctx.stats["groups"].values())


def skipped(ctx) -> list[dict]:
    return list(ctx.stats["skipped_groups"].values())


def quantized_output_error(method, layer, cfg, inputs, ref_outputs) -> float:
    ctx = make_ctx(layer, cfg, inputs)
    q = method.quantize_layer(ctx)
    for name, qw in q.items():
        ctx.set_quantized(name, qw)
    err = sum(float((o - r).pow(2).sum()) for o, r in zip(ctx.outputs(), ref_outputs))
    return err / sum(r.numel() for r in ref_outputs)


# ---------------------------------------------------------------------------- folding
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: v_proj has a bias
@pytest.mark.parametrize("group_index", [0, 1, 2, 3])
def test_folding_scales_leaves_fp_output_unchanged(group_index, family):
    cfg = make_config(kv_heads=4, family=family)  # MHA so that v -> o applies
    layer = make_layer(cfg, seed=1)
    inputs = make_inputs(2, outliers=True)
    ctx = make_ctx(layer, cfg, inputs)
    before = ctx.outputs()
    group = ctx.arch.scale_groups[group_index]
    width = ctx.module(group.linears[0]).in_features
    scales = torch.rand(width, generator=torch.Generator().manual_seed(3)) * 4 + 0.1
    snapshot = {n: ctx.module(n).weight.clone() for n in (group.prev, *group.linears)}
    fold_scales(layer, group.prev, group.linears, scales)
    for n, w in snapshot.items():  # the fold really changed the weights
        assert not torch.equal(ctx.module(n).weight, w)
    for a, b in zip(ctx.outputs(), before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- α choice
def test_flat_activations_choose_alpha_zero():
    # Non-duo scaling: with |x| identical on every channel, s = mean|x|^α is 1 for every α,
    # so every grid point scores the same and the first (α = 0) must be kept.
    cfg = make_config()
    layer = make_layer(cfg, seed=4)
    with torch.no_grad():
        layer.input_layernorm.weight.fill_(1.0)  # keep the norm output flat as well
    ctx = make_ctx(layer, cfg, make_inputs(5, outliers=False, flat=True))
    AWQ(duo_scaling=False, clip=False, **SMALL).quantize_layer(ctx)
    first = groups(ctx)[0]
    assert first["prev"] == "input_layernorm"
    assert first["alpha"] == 0.0
    assert len(set(first["losses"])) == 1  # the grid really was flat


def test_outlier_channels_choose_larger_alpha():
    # Non-duo scaling (the clean version: s depends on activations only). Three hidden
    # channels 40x larger than the rest; their weights must be protected, so α > 0 clearly.
    cfg = make_config()
    layer = make_layer(cfg, seed=6)
    ctx = make_ctx(layer, cfg, make_inputs(7, outliers=True))
    AWQ(duo_scaling=False, clip=False, grid=20).quantize_layer(ctx)
    by_prev = {g["prev"]: g for g in groups(ctx)}
    for prev in ("input_layernorm", "post_attention_layernorm"):
        g = by_prev[prev]
        assert g["alpha"] >= 0.25, (prev, g["alpha"], g["losses"])
        assert g["loss"] < 0.7 * g["loss_rtn"], (prev, g)


@pytest.mark.parametrize("duo", [False, True])
def test_search_matches_a_naive_reference_loop(duo):
    # An independent, deliberately plain transcription of AutoAWQ's _search_best_scale for
    # the first group (q/k/v judged on the whole attention): same losses, same α.
    cfg = make_config(kv_heads=2)
    layer = make_layer(cfg, seed=24)
    inputs = make_inputs(25, outliers=True)
    ctx = make_ctx(copy.deepcopy(layer), cfg, inputs)
    AWQ(duo_scaling=duo, clip=False, grid=8).quantize_layer(ctx)
    ours = groups(ctx)[0]

    attn = layer.self_attn
    names = ("q_proj", "k_proj", "v_proj")
    xs = [layer.input_layernorm(x) for x in inputs]
    kw = make_ctx(layer, cfg, inputs).layer_kwargs
    run = lambda x: attn(hidden_states=x, position_embeddings=kw["position_embeddings"],  # noqa
                         attention_mask=None)[0]
    ref = [run(x) for x in xs]
    x_mean = torch.cat([x.reshape(-1, HIDDEN) for x in xs]).abs().mean(0)
    w = torch.cat([getattr(attn, n).weight for n in names])
    wg = w.abs().reshape(-1, 32)
    w_mean = (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    originals = {n: getattr(attn, n).weight.clone() for n in names}
    losses = []
    for i in range(8):
        a = i / 8
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for n in names:
            getattr(attn, n).weight.data = fake_quantize(originals[n] * s, 4, 32) / s
        num = sum(float((run(x) - r).pow(2).sum()) for x, r in zip(xs, ref))
        losses.append(num / sum(r.numel() for r in ref))
    assert ours["losses"] == pytest.approx(losses, rel=1e-4)
    assert ours["alpha"] == losses.index(min(losses)) / 8


def test_fp_function_is_preserved_after_the_search():
    # Before any weight is swapped for its quantized value, the folded layer computes the
    # same function as the original one (scales only moved between ops).
    cfg = make_config(kv_heads=4)
    layer = make_layer(cfg, seed=26)
    inputs = make_inputs(27, outliers=True)
    before = make_ctx(layer, cfg, inputs).outputs()
    ctx = make_ctx(copy.deepcopy(layer), cfg, inputs)
    AWQ(**SMALL).quantize_layer(ctx)
    assert len(groups(ctx)) == 4 and groups(ctx)[0]["alpha"] > 0
    assert not torch.equal(ctx.layer.input_layernorm.weight, layer.input_layernorm.weight)
    for a, b in zip(ctx.outputs(), before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_grid_search_skips_nonfinite_and_falls_back():
    x_mean = torch.linspace(0.1, 5.0, 16)
    calls = []

    def half_nan(s):
        calls.append(s)
        return math.nan if len(calls) % 2 else float(len(calls))

    r = grid_search(half_nan, x_mean, None, grid=6)
    assert r["alpha"] == 1 / 6  # first finite loss (call 2) is the smallest finite one
    r = grid_search(lambda s: math.inf, x_mean, None, grid=6)
    assert r["alpha"] is None and torch.equal(r["scales"], torch.ones(16))
    s = candidate_scales(x_mean, torch.rand(16), 0.5)
    assert torch.isfinite(s).all() and math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-5)


# ---------------------------------------------------------------------------- shapes
def test_gqa_skips_v_to_o_and_mha_applies_it(caplog):
    caplog.set_level("INFO", logger="quantizer")
    for kv_heads, expect_vo in ((2, False), (4, True)):
        cfg = make_config(kv_heads=kv_heads)
        ctx = make_ctx(make_layer(cfg, seed=8), cfg, make_inputs(9, outliers=True))
        q = AWQ(clip=False, **SMALL).quantize_layer(ctx)
        applied = [g["prev"] for g in groups(ctx)]
        skipped_prevs = [g["prev"] for g in skipped(ctx)]
        assert ("self_attn.v_proj" in applied) == expect_vo
        assert ("self_attn.v_proj" in skipped_prevs) == (not expect_vo)
        assert set(q) == set(ctx.arch.linears)  # o_proj is quantized either way
        if not expect_vo:
            assert any("skipping scale group self_attn.v_proj" in m for m in caplog.messages)
            assert "width" in skipped(ctx)[0]["reason"]  # GQA: v is narrower than o's input


# ---------------------------------------------------------------------------- quality
def test_awq_beats_rtn_on_outlier_layer():
    cfg = make_config(kv_heads=2)
    layer = make_layer(cfg, seed=10)
    inputs = make_inputs(11, outliers=True)
    ref = make_ctx(layer, cfg, inputs).outputs()
    err_rtn = quantized_output_error(RTN(), copy.deepcopy(layer), cfg, inputs, ref)
    err_awq = quantized_output_error(get_method("awq", **SMALL), copy.deepcopy(layer), cfg,
                                     inputs, ref)
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_and_beats_rtn(family):
    cfg = make_config(kv_heads=2, family=family)  # GQA: v -> o skipped everywhere
    layer = make_layer(cfg, seed=19)
    inputs = make_inputs(20, outliers=True)
    ref = make_ctx(layer, cfg, inputs).outputs()
    err_rtn = quantized_output_error(RTN(), copy.deepcopy(layer), cfg, inputs, ref)
    err_awq = quantized_output_error(AWQ(**SMALL), copy.deepcopy(layer), cfg, inputs, ref)
    assert math.isfinite(err_awq) and err_awq < err_rtn, (family, err_awq, err_rtn)


def test_row_sliced_helpers_equal_whole_tensor_versions(monkeypatch):
    import quantizer.methods.awq as awq_mod
    from quantizer.methods import awq_memory
    from quantizer.methods.awq_scales import weight_group_mean, write_candidate
    monkeypatch.setattr(awq_memory, "QUANTIZE_SLICE_ELEMENTS", 5 * 64)  # 5-row slices
    monkeypatch.setattr(awq_memory, "CANDIDATE_SLICE_ELEMENTS", 7 * 64)  # 7-row slices
    gen = torch.Generator().manual_seed(28)
    w = torch.randn(48, 64, generator=gen)
    ratio = 0.55 + 0.45 * torch.rand(48, 2, generator=gen)
    st = QuantSettings(bits=4, group_size=32)
    q = awq_mod.quantize_by_rows(w, st, ratio, "w")
    assert torch.equal(q.dequantize(), fake_quantize(w, 4, 32, clip_ratio=ratio))
    s = 0.5 + torch.rand(64, generator=gen)
    dest = torch.empty_like(w)
    write_candidate(dest, w, s, st, torch.float32)
    assert torch.equal(dest, fake_quantize(w * s, 4, 32) / s)
    v = torch.randn(20, 64, generator=gen)
    both = torch.cat([w, v]).abs().reshape(68, 2, 32)
    expect = (both / (both.amax(-1, keepdim=True) + 1e-6)).reshape(68, 64).mean(0)
    torch.testing.assert_close(weight_group_mean([w, v], 32), expect)


def test_clip_search_matches_rtn_and_never_hurts():
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(48, 64, generator=gen)
    w[:, 5] *= 8  # a heavy weight column makes clipping worthwhile in its group
    x = torch.randn(100, 64, generator=gen)
    ratios = shrink_ratios(20, 0.5)
    assert ratios[0] == 1.0 and min(ratios) == pytest.approx(0.55)
    best, stats = search_clip(w, x, 4, 32, False, ratios)
    assert best.shape == (48, 2) and stats["clipped_fraction"] > 0
    assert stats["err_ratio"] <= 1.0
    # The float fake-quantizer is bit-identical to rtn's; the chosen ratios lower the error.
    assert torch.equal(fake_quantize_float(w, 4, 32, False), fake_quantize(w, 4, 32))
    err = lambda q: float(((x @ q.t()) - (x @ w.t())).pow(2).sum())  # noqa: E731
    assert err(fake_quantize(w, 4, 32, clip_ratio=best)) < err(fake_quantize(w, 4, 32))


# ---------------------------------------------------------------------------- fp16 / det.
def test_half_precision_never_nan(caplog):
    # The fp16 MLP output overflows (up/down scaled so |out| > 65504): the search must
    # detect it, evaluate in float32, and return finite quantized weights and losses.
    cfg = make_config(kv_heads=2)
    layer = make_layer(cfg, seed=13)
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(100)
        layer.mlp.down_proj.weight.mul_(2000)
    layer = layer.half()
    inputs = make_inputs(14, outliers=True, dtype=torch.float16, outlier_scale=20.0)
    ctx = make_ctx(layer, cfg, inputs, dtype=torch.float16)
    q = AWQ(**SMALL).quantize_layer(ctx)
    by_prev = {g["prev"]: g for g in groups(ctx)}
    assert by_prev["post_attention_layernorm"]["eval_dtype"] == "float32"
    assert by_prev["post_attention_layernorm"]["overflow"]
    assert not by_prev["input_layernorm"]["overflow"]  # attention output fits in fp16
    assert any("overflows" in m for m in caplog.messages)
    for g in groups(ctx):
        assert g["alpha"] is not None and math.isfinite(g["loss"]), g
    for name, qw in q.items():
        assert torch.isfinite(qw.scales).all(), name
    for p in layer.parameters():
        assert p.dtype == torch.float16 and torch.isfinite(p).all()


def test_bfloat16_layer_runs_in_bfloat16():
    cfg = make_config(kv_heads=2)
    layer = make_layer(cfg, seed=29, dtype=torch.bfloat16)
    inputs = make_inputs(30, outliers=True, dtype=torch.bfloat16)
    ctx = make_ctx(layer, cfg, inputs, dtype=torch.bfloat16)
    q = AWQ(**SMALL).quantize_layer(ctx)
    for g in groups(ctx):
        assert g["eval_dtype"] == "bfloat16" and math.isfinite(g["loss"]), g
    assert groups(ctx)[0]["loss"] < groups(ctx)[0]["loss_rtn"]
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert all(torch.isfinite(qw.scales).all() for qw in q.values())


def test_nonfinite_inputs_fall_back_to_rtn_without_poisoning_weights(caplog):
    # A NaN in the calibration data makes every judge output non-finite, in any dtype:
    # each group keeps s = 1, says so, and the result equals plain RTN of the fp weights.
    cfg = make_config(kv_heads=2)
    layer = make_layer(cfg, seed=22)
    inputs = make_inputs(23, outliers=False)
    inputs[1][0, 3, 5] = math.nan
    original = copy.deepcopy(layer)
    ctx = make_ctx(layer, cfg, inputs)
    q = AWQ(**SMALL).quantize_layer(ctx)
    assert groups(ctx) and all(g["fallback"] for g in groups(ctx))
    assert sum("no finite loss" in m for m in caplog.messages) == len(groups(ctx))
    for name, qw in q.items():
        expect = fake_quantize(original.get_submodule(name).weight, 4, 32)
        assert torch.equal(qw.dequantize(), expect), name


def test_fold_overflow_is_detected():
    # A tiny scale would push the norm weight past 65504 (fp16 layer, or fp16 export of an
    # fp32 layer); such a candidate is refused. Norm weights here are in [0.5, 1.5].
    cfg = make_config()
    for dtype in (torch.float16, torch.float32):
        layer = make_layer(cfg, seed=21, dtype=dtype)
        s = torch.ones(HIDDEN)
        s[7] = 1e-3
        assert not fold_overflows(layer, "input_layernorm", s), dtype
        s[7] = 1e-5
        assert fold_overflows(layer, "input_layernorm", s), dtype


def test_two_runs_are_bit_identical():
    cfg = make_config(kv_heads=4)
    base = make_layer(cfg, seed=15)
    inputs = make_inputs(16, outliers=True)
    runs = []
    for _ in range(2):
        layer = copy.deepcopy(base)
        ctx = make_ctx(layer, cfg, inputs)
        q = AWQ(**SMALL).quantize_layer(ctx)
        runs.append((q, {k: v.clone() for k, v in layer.state_dict().items()},
                     [g["alpha"] for g in groups(ctx)]))
    (q1, sd1, a1), (q2, sd2, a2) = runs
    assert a1 == a2
    for name in q1:
        for f in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(q1[name], f), getattr(q2[name], f)), (name, f)
    assert_same_tensors(sd1, sd2)


def test_registered_and_reports_stats():
    cfg = make_config(kv_heads=2)
    ctx = make_ctx(make_layer(cfg, seed=17), cfg, make_inputs(18, outliers=True))
    method = get_method("awq", **SMALL)
    assert method.name == "awq" and method.needs_calibration
    method.quantize_layer(ctx)
    assert set(ctx.stats["time_s"]) == {"calibrate", "search", "clip", "quantize"}
    assert set(ctx.stats["clip"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                      "mlp.up_proj", "mlp.down_proj"}
    assert all(c["tokens"] == 64 for c in ctx.stats["clip"].values())
    assert all(g["loss_rtn"] is not None for g in groups(ctx))
