"""Measurement pass on a tiny Llama decoder layer: errors fall with bits, bpw is the exact
storage cost, the Hessian-based error equals a real forward's, mixtures are only offered where
they make sense, unfit group sizes are skipped, the layer stays float, and the results go
through measurement.json and back into GPTQ per-module settings."""
import random

import pytest
import torch

from quantizer.methods.registry import get_method
from quantizer.methods.gptq import HessianAccumulator, quantize_group
from quantizer.methods.measure import (CandidateSpec, Setting, default_candidates, group_label,
                                       measure_layer, module_settings_from_selection,
                                       store_groups)
from quantizer.export.serving import candidate_servable
from test_gptq import tiny_llama_context
from quantizer.settings import GPTQOptions

# the options these tests were written with: no act-order (the measurement's old default)
NO_ACT = GPTQOptions(act_order=False, static_groups=False).resolved()


@pytest.fixture(scope="module")
def measured():
    ctx = tiny_llama_context(bits=4, seed=random.randrange(1000), n_chunks=2)
    before = {n: ctx.module(n).weight.detach().clone() for n in ctx.arch.linears}
    results = measure_layer(ctx, options=NO_ACT)
    return ctx, before, results


def by_label(res):
    return {r.label: r for r in res}


def test_layer_stays_float_and_every_group_is_measured(measured):
    ctx, before, results = measured
    for n, w in before.items():
        assert torch.equal(ctx.module(n).weight, w), n
    assert list(results) == [group_label(g) for g in ctx.arch.input_groups]
    assert "self_attn.q_proj+k_proj+v_proj" in results and "mlp.down_proj" in results
    # one GPTQ solve per (group, distinct setting); mixtures reuse them
    n_settings = len({s for c in default_candidates() for s in (c.first, c.rest) if s})
    assert ctx.stats["measure_solves"] == 4 * n_settings


def test_errors_fall_with_bits(measured):
    _, _, results = measured
    for label, res in results.items():
        r = by_label(res)
        chain = [r[f"{b}b g128"].err for b in (3, 4, 5, 6, 8)]
        assert all(a > b for a, b in zip(chain, chain[1:])), (label, chain)
        assert r["2b g64"].err > r["3b g64"].err > r["4b g64"].err, label
        assert 0 < r["8b g128"].err < 0.01 and r["2b g32"].err < 1


def test_bpw_is_exact_storage_cost(measured):
    _, _, results = measured
    for res in results.values():
        for r in res:
            assert r.bpw == pytest.approx(r.storage_bits / r.numel, rel=0, abs=1e-12)
            if r.uniform:
                (s,) = set(r.modules.values())
                # asymmetric: codes + fp16 scale + one packed zero per group
                assert r.bpw == pytest.approx(s.bits + (16 + s.bits) / s.group_size, abs=1e-12)
            else:
                assert sum(p["fraction"] for p in r.parts) == pytest.approx(1)
                assert r.bpw == pytest.approx(sum(p["fraction"] * (p["bits"] + (16 + p["bits"])
                                                                   / p["group_size"])
                                                  for p in r.parts), abs=1e-12)


def test_mixtures_only_on_multi_linear_groups_and_between_their_parts(measured):
    _, _, results = measured
    for label, res in results.items():
        r = by_label(res)
        mixed = [x for x in res if not x.uniform]
        if "+" in label:
            assert {x.label for x in mixed} == {"3b g128 + 4b g128", "4b g128 + 5b g128",
                                                "4b g128 + 6b g128"}
            m = r["4b g128 + 5b g128"]
            assert r["5b g128"].err < m.err < r["4b g128"].err
            assert r["4b g128"].bpw < m.bpw < r["5b g128"].bpw
        else:
            assert mixed == []


def test_hessian_error_equals_a_real_forward():
    ctx = tiny_llama_context(bits=4, seed=random.randrange(1000), n_chunks=2)
    group = ("mlp.gate_proj", "mlp.up_proj")
    spec = CandidateSpec(Setting(3, 32), Setting(4, 64))
    res = by_label(measure_layer(ctx, [spec], options=NO_ACT)[group_label(group)])[spec.label]
    xs = [seen[group[0]] for seen in ctx.capture([group[0]])]
    acc = HessianAccumulator(128)
    for x in xs:
        acc.add(x)
    qs, _ = quantize_group(ctx, group, acc.H, {"mlp.gate_proj": (3, 32), "mlp.up_proj": (4, 64)},
                           False, NO_ACT)
    num = den = 0.0
    for n in group:
        w = ctx.module(n).weight
        for x in xs:
            y, y_hat = x @ w.t(), x @ qs[n].dequantize().t()
            num += float((y - y_hat).pow(2).sum())
            den += float(y.pow(2).sum())
    assert res.err == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_unfit_group_sizes_are_skipped_but_every_width_stays_covered():
    ctx = tiny_llama_context(bits=4, n_chunks=1)
    res = measure_layer(ctx, [CandidateSpec(Setting(4, 96)), CandidateSpec(Setting(3, 32)),
                              CandidateSpec(Setting(4, 64))], options=NO_ACT)
    for label, rs in res.items():
        assert [r.label for r in rs] == ["3b g32", "4b g64"]  # 4b g96 skipped, 4b covered
    res = measure_layer(ctx, [CandidateSpec(Setting(4, 96)), CandidateSpec(Setting(5, 96))], options=NO_ACT)
    for label, rs in res.items():  # no fitting candidate: largest fitting group size stands in
        assert [r.label for r in rs] == ["4b g128", "5b g128"]
        assert rs[0].err > rs[1].err


def test_plans_fall_back_to_per_channel_when_no_group_size_fits():
    from quantizer.methods.measure import plans_for
    group = ("mlp.gate_proj", "mlp.up_proj")
    plans = plans_for(default_candidates(), group, 48)  # 48: no 128/64/32 divides it
    labels = [c.label for c, _ in plans]
    assert labels == ["2b ch", "3b ch", "4b ch", "5b ch", "6b ch", "8b ch"]
    plans = plans_for(default_candidates(), group, 576)  # SmolLM2's hidden size
    labels = [c.label for c, _ in plans]
    assert "5b g64" in labels and "8b g64" in labels and "4b g128" not in labels


def test_store_round_trip_and_selection_drives_gptq(tmp_path):
    store_mod = pytest.importorskip("quantizer.measurements.store")
    ctx = tiny_llama_context(bits=4, n_chunks=1)
    small = [CandidateSpec(Setting(3, 64)), CandidateSpec(Setting(8, 128)),
             CandidateSpec(Setting(3, 64), Setting(8, 128))]
    groups = store_groups(ctx, measure_layer(ctx, small, options=NO_ACT))
    store = store_mod.MeasurementStore.create(
        tmp_path / "measurement.json", {"model": "tiny", "calibration": "rand", "settings": {}})
    store.record_layer(0, groups)
    loaded = store_mod.MeasurementStore.load(tmp_path / "measurement.json")
    # pick the mixture for gate/up and 8-bit elsewhere
    picks = {}
    for label, g in loaded.layers[0]["groups"].items():
        labels = [c["label"] for c in g["candidates"]]
        want = "3b g64 + 8b g128" if label == "mlp.gate_proj+up_proj" else "8b g128"
        picks[label] = g["candidates"][labels.index(want)]
    settings = module_settings_from_selection({0: picks}, ctx.arch)
    assert settings["model.layers.0.mlp.gate_proj"] == (3, 64)
    assert settings["model.layers.0.mlp.up_proj"] == (8, 128)
    quantized = get_method("gptq", module_settings=settings).quantize_layer(ctx)
    assert quantized["mlp.gate_proj"].bits == 3 and quantized["mlp.up_proj"].bits == 8
    assert quantized["self_attn.k_proj"].bits == 8
    assert not candidate_servable(picks["mlp.gate_proj+up_proj"], symmetric=True, expert=False)
    assert candidate_servable(picks["mlp.down_proj"], symmetric=False, expert=False)
    assert not candidate_servable({"label": "3b g64", "bits": 3, "uniform": True,
                                   "modules": {"a": {"bits": 3, "group_size": 64}}},
                                  symmetric=False, expert=False)
