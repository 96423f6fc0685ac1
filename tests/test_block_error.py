"""The measurement's block errors and residual shares on a tiny Llama decoder layer: a block
judge restores the float weights, reproduces a hand-run block forward, gives 0 for the float
weights; q/k/v and gate/up are judged through their block, o_proj and down_proj are not (their
output is the block's); residual shares match the stream the layer computes; the store uses
block errors and residual weights the way the optimiser needs them."""
import math

import torch

from quantizer.methods.context import run_module
from quantizer.measurements.store import MeasurementStore, share
from quantizer.methods.block_error import BlockJudge, judge_for
from quantizer.methods.gptq import quantize_group
from quantizer.methods.measure import measure_layer, store_groups, CandidateSpec, Setting
from quantizer.methods.residual_share import residual_shares
from test_gptq import tiny_llama_context
from quantizer.settings import GPTQOptions

# the options these tests were written with: no act-order (the measurement's old default)
NO_ACT = GPTQOptions(act_order=False, static_groups=False).resolved()

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _quantized(ctx, names, bits):
    qs, _ = quantize_group(ctx, names, None, {n: (bits, 32) for n in names}, False, NO_ACT,
                           _prepared(ctx, names))
    return qs


def _prepared(ctx, names):
    from quantizer.methods.gptq import group_hessians, prepare_hessian
    return prepare_hessian(group_hessians(ctx, [tuple(names)])[tuple(names)].H)


def test_judge_matches_a_hand_run_block_and_restores_weights():
    ctx = tiny_llama_context(bits=4, seed=3, n_chunks=2)
    judge = BlockJudge(ctx, "self_attn")
    assert judge.error({}) == 0.0
    before = {n: ctx.module(n).weight.detach().clone() for n in QKV}
    qs = _quantized(ctx, QKV, 2)
    err = judge.error(qs)
    for n in QKV:
        assert torch.equal(ctx.module(n).weight, before[n])  # restored
    # by hand: swap the weights in, run the attention on the captured inputs
    num = den = 0.0
    for n in QKV:
        ctx.module(n).weight.data = qs[n].dequantize(ctx.module(n).weight.dtype)
    for (x, kw), ref in zip(judge.data, judge.refs):
        out = run_module(judge.module, x, kw)
        num += float((out.double() - ref.double()).square().sum())
        den += float(ref.double().square().sum())
    for n in QKV:
        ctx.module(n).weight.data = before[n]
    assert err > 0 and math.isclose(err, math.sqrt(num / den), rel_tol=1e-4)
    assert judge.error(_quantized(ctx, QKV, 6)) < err


def test_which_groups_go_through_their_block():
    ctx = tiny_llama_context(bits=4, seed=4, n_chunks=1)
    judges = {}
    kinds = {g: judge_for(ctx, g, judges) is not None for g in ctx.arch.input_groups}
    assert kinds == {QKV: True, ("self_attn.o_proj",): False,
                     ("mlp.gate_proj", "mlp.up_proj"): True, ("mlp.down_proj",): False}


def test_measurement_records_block_errors_and_shares(tmp_path):
    ctx = tiny_llama_context(bits=4, seed=5, n_chunks=2)
    specs = [CandidateSpec(Setting(3, 32)), CandidateSpec(Setting(5, 32)),
             CandidateSpec(Setting(3, 32), Setting(5, 32))]
    results = measure_layer(ctx, specs, options=NO_ACT)
    for label, res in results.items():
        judged = label.startswith("self_attn.q") or label.startswith("mlp.gate")
        assert all((r.block_err is not None) == judged for r in res), label
        if judged:  # more bits, smaller block error; the mixture in between
            by = {r.label: r.block_err for r in res}
            assert by["5b g32"] < by["3b g32 + 5b g32"] < by["3b g32"]
    inputs = list(ctx.inputs)
    with residual_shares(ctx) as shares:
        outs = ctx.outputs()
    # the residual after the MLP is the layer output: its energy is the output's
    out_sq = sum(float(o.double().square().sum()) for o in outs)
    tokens = sum(o.numel() // o.shape[-1] for o in outs)
    assert math.isclose(shares["mlp"]["residual_sq"], out_sq / tokens, rel_tol=1e-4)
    assert 0 < share(shares["self_attn"]) < 1 and 0 < share(shares["mlp"]) < 1
    assert inputs == ctx.inputs
    store = MeasurementStore.create(tmp_path / "m.json", {"model": {}, "calibration": {},
                                                          "settings": {}})
    store.record_layer(0, store_groups(ctx, results), blocks=shares)
    store = MeasurementStore.load(tmp_path / "m.json")
    assert store.residual_weighted and store.has_block_errors
    flat = store.groups()
    weighted = store.groups(store.residual_weight)
    for g, w in zip(flat, weighted):
        assert g.weight == 1.0 and math.isclose(w.weight, share(shares[g.name.split(".")[1]]))
    qkv = next(g for g in flat if "q_proj" in g.name)
    raw = store.layers[0]["groups"][qkv.name.split(".", 1)[1]]["candidates"]
    assert [c.err for c in qkv.candidates] == [r["block_err"] ** 2 for r in raw]


def test_shares_left_out_when_the_layer_is_not_residual():
    ctx = tiny_llama_context(bits=4, seed=6, n_chunks=1)
    hook = ctx.layer.register_forward_hook(lambda m, a, out: (out[0] * 2,) + tuple(out[1:])
                                           if isinstance(out, tuple) else out * 2)
    try:
        with residual_shares(ctx) as shares:
            ctx.outputs()
    finally:
        hook.remove()
    assert shares == {}


def test_judge_stops_at_its_token_budget_and_leaves_no_hooks():
    ctx = tiny_llama_context(bits=4, seed=7, n_chunks=3)
    per_chunk = ctx.inputs[0].numel() // ctx.inputs[0].shape[-1]
    forwards = []
    counter = ctx.module("self_attn").register_forward_hook(lambda *a: forwards.append(1))
    try:
        judge = BlockJudge(ctx, "mlp", max_tokens=per_chunk)
    finally:
        counter.remove()
    assert len(judge.data) == 1 and len(forwards) == 1  # no forward of the other chunks
    module = ctx.module("mlp")
    assert not module._forward_pre_hooks and not ctx.layer._forward_pre_hooks
    assert BlockJudge(ctx, "mlp").error({}) == 0.0  # all chunks, same result as before
