"""Importance-weighted grids (methods/grid.py), token weights (methods/token_weights.py) and
the methods that use them: RTN with calibration, GPTQ's group parameters, AWQ's final
rounding, awq-gptq."""
import copy

import pytest
import torch

from quantizer.methods.registry import get_method
from quantizer.methods.gptq import gptq_quantize
from quantizer.methods.gptq_hessian import HessianAccumulator
from quantizer.methods.grid import GridSpec, range_params, search_params
from quantizer.methods.rtn import group_params, rtn_quantize
from quantizer.methods.token_weights import residual_token_weights
from test_gptq import layer_error, tiny_llama_context


def _weights(seed=0, rows=16, cols=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 5] *= 8  # an outlier column stretches its group's range
    return w


def _error(q, w, imp):
    return float(((q.dequantize() - w) ** 2 * imp).sum())


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_search_is_group_params_bit_for_bit(symmetric):
    w = _weights().reshape(16, 4, 32)
    s0, z0 = group_params(w, 4, symmetric)
    s1, z1 = search_params(w, 4, symmetric, GridSpec("minmax"))
    assert torch.equal(s0, s1) and torch.equal(z0, z1)
    q0 = rtn_quantize(_weights(), 4, 32, symmetric)
    q1 = rtn_quantize(_weights(), 4, 32, symmetric, grid=GridSpec("minmax"),
                      importance=torch.rand(128))
    assert torch.equal(q0.codes, q1.codes) and torch.equal(q0.scales, q1.scales)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("refit", [False, True])
def test_grid_never_worse_than_minmax_per_group(symmetric, refit):
    w = _weights(1)
    imp = torch.rand(128) ** 4 + 1e-3
    spec = GridSpec("imatrix", refit=refit)
    q_mm = rtn_quantize(w, 4, 32, symmetric)
    q = rtn_quantize(w, 4, 32, symmetric, grid=spec, importance=imp)
    per_group = lambda q: (((q.dequantize() - w) ** 2 * imp).reshape(16, 4, 32).sum(-1))  # noqa
    assert bool((per_group(q) <= per_group(q_mm) * (1 + 1e-5) + 1e-12).all())
    assert _error(q, w, imp) < 0.9 * _error(q_mm, w, imp)  # the outlier column's groups gain
    assert int(q.codes.max()) <= 15 and q.symmetric == symmetric


def test_importance_protects_the_important_column():
    w = _weights(2)
    imp = torch.ones(128)
    imp[7] = 1e4  # column 7's input is large: its weights must be rounded best
    plain = rtn_quantize(w, 3, 32, grid=GridSpec("mse"))
    weighted = rtn_quantize(w, 3, 32, grid=GridSpec("imatrix"), importance=imp)
    err = lambda q: float((q.dequantize() - w)[:, 7].abs().mean())  # noqa: E731
    assert err(weighted) < err(plain)


def test_refit_zero_points_stay_integers_in_range():
    w = _weights(3) + 0.03  # skewed groups
    q = rtn_quantize(w, 4, 32, grid=GridSpec("imatrix", refit=True), importance=torch.rand(128))
    assert q.zeros.dtype == torch.int32 and int(q.zeros.min()) >= 0
    assert int(q.zeros.max()) <= 15


def test_range_params_min_zero_never_zero():
    wmax = torch.rand(4) + 0.1
    s, z = range_params(torch.zeros(4), wmax, 4, False, min_zero=1)
    assert bool((z == 1).all())
    assert bool(((15 - z) * s >= wmax * (1 - 1e-6)).all())  # the maximum still fits


@pytest.mark.parametrize("static", [False, True])
def test_gptq_grid_keeps_zero_points_and_beats_minmax(static):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 128, generator=g) * torch.exp(torch.randn(128, generator=g))
    H = 2 * x.t() @ x / 512
    w = _weights(4, rows=32) + 0.02
    q0, _ = gptq_quantize(w, H, 4, 32, act_order=True, static_groups=static)
    q1, _ = gptq_quantize(w, H, 4, 32, act_order=True, static_groups=static,
                          grid=GridSpec("imatrix", refit=True))
    assert int(q1.zeros.min()) >= 1  # checkpoint_format gptq stores zero-1
    err = lambda q: float((((q.dequantize() - w) @ H) * (q.dequantize() - w)).sum())  # noqa
    assert err(q1) < err(q0)


def test_weighted_hessian_is_the_weighted_mean():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 8, generator=g)
    w = torch.rand(2, 6, generator=g)
    acc = HessianAccumulator(8)
    acc.add(x, w)
    flat, wf = x.reshape(-1, 8), w.reshape(-1)
    torch.testing.assert_close(acc.H, 2 * (flat * wf[:, None]).t() @ flat / 12)


def test_residual_token_weights_are_one_over_mean_square_of_the_stream():
    ctx = tiny_llama_context(n_chunks=2)
    ctx.inputs[0][0, 3] *= 50  # a massive token
    tw = residual_token_weights(ctx)
    assert set(tw) == {"self_attn", "mlp"}
    x = ctx.inputs[0]
    y = ctx.forward(x)
    torch.testing.assert_close(tw["mlp"][0], 1 / y.pow(2).mean(-1), rtol=1e-4, atol=0)
    assert float(tw["mlp"][0][0, 3]) < 0.01 * float(tw["mlp"][0][0, 4])
    assert tw["self_attn"][1].shape == ctx.inputs[1].shape[:2]


def test_rtn_imatrix_calibrates_and_beats_minmax():
    ctx = tiny_llama_context(bits=3)
    fp_out = ctx.outputs()
    method = get_method("rtn", scale_search="imatrix")
    assert method.needs_calibration and not get_method("rtn").needs_calibration
    base = copy.copy(ctx)
    base.layer = copy.deepcopy(ctx.layer)
    err_mm = layer_error(base, fp_out, get_method("rtn").quantize_layer(base))
    err = layer_error(ctx, fp_out, method.quantize_layer(ctx))
    assert err < err_mm


def test_rtn_imatrix_without_inputs_is_a_clear_error():
    from quantizer.errors import InputError
    ctx = tiny_llama_context()
    ctx.inputs = []
    with pytest.raises(InputError, match="needs calibration inputs"):
        get_method("rtn", scale_search="imatrix").quantize_layer(ctx)


@pytest.mark.parametrize("method,options", [
    ("gptq", {"token_weights": "residual", "scale_search": "imatrix"}),  # in make test-fast
    pytest.param("awq", {"token_weights": "residual", "scale_search": "imatrix"},
                 marks=pytest.mark.slow),
    pytest.param("awq-gptq", {}, marks=pytest.mark.slow),
    pytest.param("awq-gptq", {"token_weights": "residual", "act_order": True,
                              "static_groups": True}, marks=pytest.mark.slow),
])
def test_methods_with_grids_and_token_weights_beat_rtn(method, options):
    ctx = tiny_llama_context(bits=3)
    fp_out = ctx.outputs()
    base = copy.copy(ctx)
    base.layer = copy.deepcopy(ctx.layer)
    err_rtn = layer_error(base, fp_out, get_method("rtn").quantize_layer(base))
    quantized = get_method(method, **options).quantize_layer(ctx)
    assert set(quantized) == set(ctx.arch.linears)
    assert layer_error(ctx, fp_out, quantized) < err_rtn


def test_bad_option_values_are_refused():
    from quantizer.errors import InputError
    with pytest.raises(InputError, match="scale-search"):
        get_method("gptq", scale_search="best")
    with pytest.raises(InputError, match="token-weights"):
        get_method("rtn", token_weights="all")
    with pytest.raises(InputError, match="unknown awq-gptq option"):
        get_method("awq-gptq", clip=True)


def test_outlier_weights_discount_only_massive_tokens():
    from quantizer.methods.token_weights import outlier_weights
    ms = torch.ones(2, 64)
    ms[0, 0] = 1000.0 ** 2  # a sink: its stream's rms is 1000 against a median of 1
    w = outlier_weights(1.0 / ms, factor=4.0)
    assert torch.equal(w[1], torch.ones(64))
    assert torch.equal(w[0, 1:], torch.ones(63))
    assert float(w[0, 0]) == pytest.approx(16.0 / 1000.0 ** 2)


@pytest.mark.slow
def test_awq_gptq_rounds_the_smoothed_weights():
    """awq-gptq is not plain GPTQ: AWQ's scales are folded before GPTQ rounds."""
    ctx = tiny_llama_context(bits=3)
    plain = copy.copy(ctx)
    plain.layer = copy.deepcopy(ctx.layer)
    g = get_method("gptq").quantize_layer(plain)
    a = get_method("awq-gptq").quantize_layer(ctx)
    assert set(a) == set(g)
    differ = [n for n in a if not torch.equal(a[n].dequantize(torch.float32),
                                             g[n].dequantize(torch.float32))]
    assert differ
