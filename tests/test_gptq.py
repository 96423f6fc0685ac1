"""GPTQ core and method: beats RTN on correlated inputs, reduces to RTN when H = I, act-order
g_idx is a consistent permutation, static groups stay contiguous, Cholesky failures retry at
higher damping (logged), dead columns quantize to 0, and the method lowers a real Llama
decoder layer's output error versus RTN."""
import copy
import random
from dataclasses import replace

import pytest
import torch

from quantizer.arch import get_arch
from quantizer.settings import QuantSettings
from quantizer.methods.context import LayerContext
from quantizer.methods.registry import get_method
from quantizer.methods.gptq import HessianAccumulator, gptq_quantize, output_error
from quantizer.methods.rtn import RTN, rtn_quantize


def correlated_inputs(n_tokens, n, gen):
    """Inputs with correlated, unevenly scaled channels (what makes GPTQ beat RTN)."""
    mix = torch.eye(n) + 1.5 * torch.randn(n, n, generator=gen) / n ** 0.5
    scale = torch.exp(torch.randn(n, generator=gen))
    return (torch.randn(n_tokens, n, generator=gen) @ mix) * scale


def hessian_of(x, chunks=4):
    acc = HessianAccumulator(x.shape[-1])
    for c in x.chunk(chunks):
        acc.add(c)
    return acc


def test_hessian_accumulator_is_running_mean_of_2xtx():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    acc = hessian_of(x.half(), chunks=3)  # half inputs are accumulated in float32
    ref = 2 * x.half().double().t() @ x.half().double() / 300
    assert acc.H.dtype == torch.float32 and acc.n_tokens == 300
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-5)


# Plain GPTQ at 2 bits can lose to RTN when channel scales vary wildly (error feedback
# widens later groups' ranges); act-order fixes that, so 2-bit is checked with it.
@pytest.mark.parametrize("bits,act_order", [(2, True), (3, False), (4, False), (4, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    # A fixed draw: over 300 random draws the gain fell short of 5% for ~1% of them (3-4 bit
    # without act-order), so a fresh seed per run made CI fail now and then.
    gen = torch.Generator().manual_seed(1234 + bits)
    x = correlated_inputs(1024, 128, gen)
    H = hessian_of(x).H
    w = torch.randn(48, 128, generator=gen)
    q, info = gptq_quantize(w, H, bits, 32, act_order=act_order)
    rtn = rtn_quantize(w, bits, 32)
    # measured through a real forward, not only through H
    err_gptq = ((x @ (w - q.dequantize()).t()).norm() / (x @ w.t()).norm()).item()
    err_rtn = ((x @ (w - rtn.dequantize()).t()).norm() / (x @ w.t()).norm()).item()
    assert err_gptq < 0.95 * err_rtn, (err_gptq, err_rtn)
    assert abs(output_error(w, q.dequantize(), H) - err_gptq) < 1e-3 * max(1.0, err_gptq) + 1e-4
    assert info["retries"] == 0 and q.codes.shape == w.shape and q.scales.shape == (48, 4)


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (-1, False)])
def test_identity_hessian_reduces_to_rtn(group_size, symmetric):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    w = torch.randn(40, 128, generator=gen)
    q, _ = gptq_quantize(w, torch.eye(128), 4, group_size, symmetric=symmetric)
    ref = rtn_quantize(w, 4, group_size, symmetric=symmetric)
    assert torch.equal(q.codes, ref.codes)
    torch.testing.assert_close(q.scales, ref.scales, rtol=0, atol=0)
    assert torch.equal(q.zeros, ref.zeros)


def test_act_order_with_static_groups_keeps_g_idx_contiguous():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = correlated_inputs(512, 128, gen)
    H = hessian_of(x).H
    w = torch.randn(32, 128, generator=gen)
    q, _ = gptq_quantize(w, H, 4, 32, act_order=True, static_groups=True)
    assert q.g_idx is None  # canonical: group of column i is i // 32
    assert torch.equal(q.group_index(), torch.arange(128) // 32)
    # static params are the RTN params of the unpermuted (group-contiguous) weight
    torch.testing.assert_close(q.scales, rtn_quantize(w, 4, 32).scales)
    assert output_error(w, q.dequantize(), H) < output_error(w, rtn_quantize(w, 4, 32)
                                                             .dequantize(), H)


def test_act_order_g_idx_is_a_consistent_permutation():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = correlated_inputs(512, 128, gen)
    H = hessian_of(x).H
    w = torch.randn(32, 128, generator=gen)
    q, _ = gptq_quantize(w, H, 4, 32, act_order=True)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32
    # the k-th group holds the k-th run of 32 columns in descending-diag(H) order
    assert torch.equal(q.g_idx[perm].long(), torch.arange(128) // 32)
    assert torch.bincount(q.g_idx.long()).tolist() == [32] * 4
    manual = (q.codes.float() - q.zeros.float()[:, q.g_idx.long()]) * q.scales[:, q.g_idx.long()]
    torch.testing.assert_close(q.dequantize(), manual)
    rtn_err = output_error(w, rtn_quantize(w, 4, 32).dequantize(), H)
    assert output_error(w, q.dequantize(), H) < rtn_err


def test_cholesky_failure_retries_with_more_damping_and_logs(caplog):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    n = 64
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.ones(n, dtype=torch.float64)
    eig[0] = -0.05  # indefinite: 0.01*mean(diag) is too little damping, 0.1*mean is enough
    H = (basis * eig) @ basis.t()
    caplog.set_level("INFO", logger="quantizer")
    w = torch.randn(16, n, generator=gen)
    q, info = gptq_quantize(w, H.float(), 4, 32)
    assert info["retries"] == 1 and info["damp_used"] == pytest.approx(0.1)
    logs = caplog.messages
    assert len(logs) == 1 and "Cholesky failed" in logs[0] and "damp=0.1" in logs[0]
    assert torch.isfinite(q.dequantize()).all()


def test_cholesky_exception_is_retried(monkeypatch, caplog):
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def flaky(a, *args, **kwargs):  # the in-place call and its out-of-place fallback fail
        calls["n"] += 1
        if calls["n"] <= 2:
            raise torch.linalg.LinAlgError("forced failure")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    caplog.set_level("INFO", logger="quantizer")
    w = torch.randn(8, 64)
    q, info = gptq_quantize(w, torch.eye(64), 3, 32, damp=0.02)
    assert info["retries"] == 1 and info["damp_used"] == pytest.approx(0.2)
    assert "forced failure" in caplog.messages[0]


def test_dead_column_quantizes_to_zero():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = correlated_inputs(256, 64, gen)
    x[:, 5] = 0
    x[:, 40] = 0
    H = hessian_of(x).H
    w = torch.randn(16, 64, generator=gen)
    for act_order in (False, True):
        q, info = gptq_quantize(w, H, 4, 32, act_order=act_order)
        deq = q.dequantize()
        assert info["dead_columns"] == 2
        assert torch.isfinite(deq).all()
        assert deq[:, 5].abs().max() == 0 and deq[:, 40].abs().max() == 0


def test_asymmetric_zero_point_never_zero():
    """A group with no negative weights must not get zero point 0 (gptq v1 stores zero-1)."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    w = torch.randn(8, 64, generator=gen)
    w[:, :32] = w[:, :32].abs()
    q, _ = gptq_quantize(w, torch.eye(64), 4, 32)
    assert int(q.zeros.min()) >= 1
    assert (q.dequantize() - w)[:, :32].abs().max() <= q.scales[:, 0].max() / 2 + 1e-6


# ---------------------------------------------------------------------------------------
# The method on a tiny transformers Llama decoder layer
# ---------------------------------------------------------------------------------------
def tiny_llama_context(bits=3, group_size=32, seed=0, n_chunks=3, seq=32):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=1, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval().requires_grad_(False)
    for mod in layer.modules():  # LLM-like weights: small normal init
        if isinstance(mod, torch.nn.Linear):
            mod.weight.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    mix = torch.eye(128) + torch.randn(128, 128, generator=gen) / 128 ** 0.5
    chan = torch.exp(0.7 * torch.randn(128, generator=gen))
    inputs = [(torch.randn(2, seq, 128, generator=gen) @ mix) * chan for _ in range(n_chunks)]
    pos = torch.arange(seq).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(cfg)(inputs[0], pos)
    settings = QuantSettings(bits=bits, group_size=group_size, method="gptq")
    return LayerContext(0, layer, get_arch("llama").for_layer(cfg, 0), cfg, settings, inputs,
                        {"position_embeddings": cos_sin, "position_ids": pos,
                         "attention_mask": None},
                        torch.device("cpu"), torch.float32)


def layer_error(ctx, fp_out, quantized):
    for name, q in quantized.items():
        ctx.set_quantized(name, q)
    new = ctx.outputs()
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(new, fp_out))
    den = sum(float(b.pow(2).sum()) for b in fp_out)
    return (num / den) ** 0.5


def test_gptq_method_beats_rtn_on_llama_layer():
    ctx = tiny_llama_context(bits=3)
    fp_out = ctx.outputs()
    rtn_ctx = copy.copy(ctx)
    rtn_ctx.layer = copy.deepcopy(ctx.layer)
    rtn_err = layer_error(rtn_ctx, fp_out, RTN().quantize_layer(rtn_ctx))

    method = get_method("gptq", damp=0.01)
    assert method.name == "gptq" and method.needs_calibration
    quantized = method.quantize_layer(ctx)
    assert set(quantized) == set(ctx.arch.linears)
    gptq_err = layer_error(ctx, fp_out, quantized)
    assert gptq_err < 0.85 * rtn_err, (gptq_err, rtn_err)
    mods = ctx.stats["modules"]
    assert set(mods) == set(ctx.arch.linears)
    for name, rec in mods.items():
        assert rec["hessian_s"] >= 0 and rec["solve_s"] > 0 and 0 < rec["rel_error"] < 1
        assert 0 < rec["weight_error"] < 1
        assert rec["tokens"] == 3 * 2 * 32
    assert ctx.stats["solve_s"] > 0 and ctx.stats["damp_retries"] == 0


def test_gptq_method_is_true_sequential():
    """The down_proj Hessian must come from inputs produced by the *quantized* gate/up."""
    ctx = tiny_llama_context(bits=2, n_chunks=1)
    seen = {}
    orig = ctx.capture

    def spying_capture(names, with_kwargs=False):
        for d in orig(names, with_kwargs):
            seen.setdefault(names[0], []).append(
                {n: m.weight.detach().clone() for n, m in ctx.layer.named_modules()
                 if isinstance(m, torch.nn.Linear)})
            yield d

    fp_weights = {n: m.weight.detach().clone() for n, m in ctx.layer.named_modules()
                  if isinstance(m, torch.nn.Linear)}
    ctx.capture = spying_capture
    quantized = get_method("gptq").quantize_layer(ctx)
    at_down = seen["mlp.down_proj"][0]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        torch.testing.assert_close(at_down[name], quantized[name].dequantize())
        assert not torch.equal(at_down[name], fp_weights[name])
    torch.testing.assert_close(seen["self_attn.q_proj"][0]["mlp.gate_proj"],
                               fp_weights["mlp.gate_proj"])


def test_unknown_option_is_refused():
    from quantizer.errors import InputError
    with pytest.raises(InputError):
        get_method("gptq", dampening=0.1)


def test_stacked_group_solve_matches_per_linear_solves():
    """Linears sharing H are solved as one stacked matrix: GPTQ is row-independent given H."""
    from quantizer.methods.gptq import prepare_hessian, split_rows
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    H = hessian_of(correlated_inputs(512, 128, gen)).H
    ws = [torch.randn(r, 128, generator=gen) for r in (48, 16, 16)]
    prep = prepare_hessian(H, act_order=True)
    stacked, _ = gptq_quantize(torch.cat(ws), None, 4, 32, act_order=True, prepared=prep)
    for w, part in zip(ws, split_rows(stacked, [48, 16, 16])):
        alone, _ = gptq_quantize(w, H, 4, 32, act_order=True)
        assert (part.codes != alone.codes).float().mean() < 1e-3  # float rounding only
        torch.testing.assert_close(part.dequantize(), alone.dequantize(), rtol=0, atol=0.05)
        assert torch.equal(part.g_idx, alone.g_idx)


def test_module_settings_override_bits_per_linear():
    ctx = tiny_llama_context(bits=4, n_chunks=1)
    down = ctx.full_name("mlp.down_proj")
    up = ctx.full_name("mlp.up_proj")
    method = get_method("gptq", module_settings={down: (8, 64), up: (3, 32)})
    quantized = method.quantize_layer(ctx)
    assert (quantized["mlp.down_proj"].bits, quantized["mlp.down_proj"].group_size) == (8, 64)
    assert quantized["mlp.up_proj"].bits == 3 and quantized["mlp.gate_proj"].bits == 4
    assert ctx.stats["modules"]["mlp.down_proj"]["bits"] == 8
    ctx.settings = replace(ctx.settings, bits=3.5)  # fractional: every module needs a setting
    from quantizer.errors import InputError
    with pytest.raises(InputError, match="measurement"):
        get_method("gptq", module_settings={down: (8, 64)}).quantize_layer(ctx)


_TRITON_CHECK = r"""
import torch
from quantizer.methods.gptq import HessianAccumulator, gptq_quantize, output_error
gen = torch.Generator().manual_seed(SEED)
x = torch.randn(256, 64, generator=gen) @ (torch.eye(64) + torch.randn(64, 64, generator=gen) / 8)
acc = HessianAccumulator(64)
acc.add(x)
w = torch.randn(40, 64, generator=gen)
for bits, gs, ao, st, sym in [(4, 16, False, False, False), (3, 32, True, False, True),
                              (4, 16, True, True, False), (2, -1, False, False, False)]:
    a, _ = gptq_quantize(w, acc.H, bits, gs, sym, ao, st, block=32, backend="torch")
    b, _ = gptq_quantize(w, acc.H, bits, gs, sym, ao, st, block=32, backend="triton")
    # Same algorithm, not the same roundings: the Python path's rank-1 updates go through
    # BLAS (fused multiply-adds), the kernel's do not; one code that lands on the other side
    # of a rounding tie changes the error fed to the rest of its row (~1 run in 8 at 3 bits).
    rows = (a.codes != b.codes).any(dim=1)
    assert int(rows.sum()) <= 2, (bits, gs, ao, st, int(rows.sum()))
    same = ~rows
    assert torch.equal(a.codes[same], b.codes[same])
    torch.testing.assert_close(a.scales[same], b.scales[same], rtol=1e-5, atol=1e-7)
    assert torch.equal(a.zeros[same], b.zeros[same])
    ea = output_error(w, a.dequantize(torch.float32), acc.H)
    eb = output_error(w, b.dequantize(torch.float32), acc.H)
    assert abs(ea - eb) <= 0.02 * ea, (bits, gs, ao, st, ea, eb)
    assert (a.g_idx is None) == (b.g_idx is None)
print("OK")
"""


@pytest.mark.slow
def test_triton_block_kernel_matches_python_path():
    """The fused Triton solver (used on CUDA) gives the Python path's codes, checked on CPU
    by Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before import)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _TRITON_CHECK.replace("SEED", str(random.randrange(2**31)))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_non_finite_hessian_is_a_clear_error():
    from quantizer.errors import InputError
    H = torch.eye(32)
    H[3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        gptq_quantize(torch.randn(8, 32), H, 4, 16)
