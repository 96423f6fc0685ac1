"""GPTQ and compressed-tensors exports: tensor names, dtypes and shapes as vLLM/AutoGPTQ and
compressed-tensors expect, bit positions checked against independent reference packers, round
trips through the packing module's unpackers, and the config.json dicts."""
import random
import re

import pytest
import torch

from quantizer.errors import InputError
from quantizer.export import get_exporter
from quantizer.export import compressed_tensors as ct
from quantizer.export import gptq as gx
from quantizer.kernels.packing import QuantizedWeight, ct_unpack_linear, gptq_unpack_linear
from quantizer.methods.gptq import HessianAccumulator, gptq_quantize


def random_q(out_f, in_f, bits, gs, act_order=False, symmetric=False, min_zero=1):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    maxq = (1 << bits) - 1
    n_groups = in_f // (in_f if gs == -1 else gs)
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen).to(torch.uint8)
    scales = (torch.rand(out_f, n_groups, generator=gen) * 0.02 + 1e-3).half().float()
    if symmetric:
        zeros = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(min_zero, maxq + 1, (out_f, n_groups), generator=gen).int()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=gen)].int()
    return QuantizedWeight(codes, scales, zeros, bits, gs, g_idx, symmetric)


def ref_pack_lsb_first(values, bits):
    """Independent reference: concatenate `values` LSB-first into one big integer, cut it
    into 32-bit words (AutoGPTQ's and compressed-tensors' dense packing)."""
    acc = 0
    for j, v in enumerate(values):
        acc |= int(v) << (j * bits)
    n_words = -(-len(values) * bits // 32)
    words = [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_tensors_layout_and_round_trip(bits, fmt):
    out_f, in_f, gs = 64, 256, 64
    q = random_q(out_f, in_f, bits, gs)
    t = gx.gptq_tensors("model.layers.0.mlp.up_proj", q, checkpoint_format=fmt)
    p = "model.layers.0.mlp.up_proj."
    assert set(t) == {p + "qweight", p + "qzeros", p + "scales", p + "g_idx"}
    assert t[p + "qweight"].dtype == torch.int32 and t[p + "qweight"].shape == (in_f * bits // 32,
                                                                               out_f)
    assert t[p + "qzeros"].dtype == torch.int32 and t[p + "qzeros"].shape == (in_f // gs,
                                                                             out_f * bits // 32)
    assert t[p + "scales"].dtype == torch.float16 and t[p + "scales"].shape == (in_f // gs, out_f)
    assert t[p + "g_idx"].dtype == torch.int32
    assert torch.equal(t[p + "g_idx"], (torch.arange(in_f) // gs).int())
    # bit positions: output column 5's input run, and group 1's zero points
    assert t[p + "qweight"][:, 5].tolist() == ref_pack_lsb_first(q.codes[5].tolist(), bits)
    stored = q.zeros[:, 1] - (1 if fmt == "gptq" else 0)
    assert t[p + "qzeros"][1].tolist() == ref_pack_lsb_first(stored.tolist(), bits)
    back = gptq_unpack_linear(t[p + "qweight"], t[p + "qzeros"], t[p + "scales"], t[p + "g_idx"],
                              bits, gs, checkpoint_format=fmt)
    assert torch.equal(back.codes.long(), q.codes.long())
    assert torch.equal(back.zeros.long(), q.zeros.long())
    assert torch.equal(back.scales.float(), q.scales)
    assert back.g_idx is None


def test_gptq_tensors_act_order_g_idx_round_trips():
    q = random_q(32, 128, 4, 32, act_order=True)
    t = gx.gptq_tensors("m", q)
    assert torch.equal(t["m.g_idx"], q.g_idx)
    back = gptq_unpack_linear(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], 4, 32)
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)


def test_gptq_export_of_a_real_gptq_result_dequantizes_the_same():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(512, 128, generator=gen) * torch.exp(torch.randn(128, generator=gen))
    acc = HessianAccumulator(128)
    acc.add(x)
    w = torch.randn(64, 128, generator=gen)
    for act_order, static in ((False, False), (True, False), (True, True)):
        q, _ = gptq_quantize(w, acc.H, 3, 32, act_order=act_order, static_groups=static)
        t = gx.gptq_tensors("m", q, "gptq")
        back = gptq_unpack_linear(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], 3,
                                  32)
        # scales go through fp16: dequantized weights agree to fp16 precision
        torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=2e-3, atol=1e-5)
        assert (back.g_idx is None) == (q.g_idx is None)


def test_gptq_export_refusals():
    with pytest.raises(InputError, match="2/3/4/8"):
        gx.gptq_tensors("m", random_q(32, 128, 5, 32))
    with pytest.raises(InputError):
        gx.gptq_quantization_config(6, 128, True, False)
    q0 = random_q(32, 128, 4, 32, min_zero=0)
    q0.zeros[3, 2] = 0
    q0.codes[3, 70] = 15  # group 2 of row 3 uses the top code: zero 0 cannot be lifted
    with pytest.raises(InputError, match="gptq_v2"):
        gx.gptq_tensors("m", q0, "gptq")
    t = gx.gptq_tensors("m", q0, "gptq_v2")  # v2 stores the raw zero point: 0 is fine
    back = gptq_unpack_linear(t["m.qweight"], t["m.qzeros"], t["m.scales"], None, 4, 32,
                              checkpoint_format="gptq_v2")
    assert int(back.zeros[3, 2]) == 0


def test_gptq_quantization_config():
    cfg = gx.gptq_quantization_config(4, 128, symmetric=True, act_order=True, damp=0.01)
    for key, val in {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                     "sym": True, "checkpoint_format": "gptq", "true_sequential": True}.items():
        assert cfg[key] == val, key
    assert gx.gptq_quantization_config(4, 128, False, True, static_groups=True)["desc_act"] is False
    assert gx.gptq_quantization_config(3, -1, False, False,
                                       checkpoint_format="gptq_v2")["checkpoint_format"] == \
        "gptq_v2"
    exp = get_exporter("gptq")
    assert exp.FORMAT == "gptq" and exp.quantization_config(4, 128, [])["bits"] == 4


@pytest.mark.parametrize("bits,gs,sym,act_order", [(4, 64, False, False), (4, 32, True, True),
                                                   (8, -1, True, False), (3, 32, False, True),
                                                   (2, 64, True, False), (6, 128, False, False)])
def test_ct_tensors_layout_and_round_trip(bits, gs, sym, act_order):
    out_f, in_f = 64, 256
    q = random_q(out_f, in_f, bits, gs, act_order=act_order, symmetric=sym)
    t = ct.ct_tensors("model.layers.2.self_attn.o_proj", q)
    t = {k.rsplit(".", 1)[1]: v for k, v in t.items()}
    n_groups = 1 if gs == -1 else in_f // gs
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_packed"].shape == (out_f, in_f * bits // 32)
    assert t["weight_scale"].dtype == torch.float16 and t["weight_scale"].shape == (out_f,
                                                                                   n_groups)
    assert t["weight_shape"].dtype == torch.int64 and t["weight_shape"].tolist() == [out_f, in_f]
    assert ("weight_zero_point" in t) == (not sym)
    assert ("weight_g_idx" in t) == act_order
    assert t["weight_packed"][7].tolist() == ref_pack_lsb_first(q.codes[7].tolist(), bits)
    if not sym:
        zp = t["weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (out_f * bits // 32, n_groups)
        # compressed-tensors packs the zero points along the output dim (packed_dim=0)
        assert zp[:, 0].tolist() == ref_pack_lsb_first(q.zeros[:, 0].tolist(), bits)
    back = ct_unpack_linear(t["weight_packed"], t["weight_scale"], t["weight_shape"], bits, gs,
                            weight_zero_point=t.get("weight_zero_point"),
                            weight_g_idx=t.get("weight_g_idx"))
    assert torch.equal(back.codes.long(), q.codes.long())
    assert torch.equal(back.zeros.long(), q.zeros.long())
    assert torch.equal(back.scales.float(), q.scales)
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)


def _matches(target, name):
    """How vLLM / compressed-tensors apply one target to a module name."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else target == name


def test_ct_quantization_config_mixed_bits_targets_exact_modules():
    names = [f"model.layers.{i}.{m}" for i in range(12)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    choice = torch.randint(0, 3, (len(names),), generator=gen).tolist()
    options = [(4, 128, True, False), (8, 128, True, False), (4, 32, False, True)]
    module_bits = {n: options[c] for n, c in zip(names, choice)}
    cfg = ct.ct_quantization_config(module_bits)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    assert len(cfg["config_groups"]) == len(set(choice))
    probes = names + ["model.layers.1.mlp.down_proj_extra", "model.layers.100.mlp.up_proj",
                      "lm_head"]
    for name in probes:
        hits = [g for g, grp in cfg["config_groups"].items()
                if any(_matches(t, name) for t in grp["targets"])]
        if name in module_bits:
            assert len(hits) == 1, (name, hits)
            w = cfg["config_groups"][hits[0]]["weights"]
            bits, gs, sym, ao = module_bits[name]
            assert (w["num_bits"], w["group_size"], w["symmetric"]) == (bits, gs, sym)
            assert w["type"] == "int" and w["strategy"] == "group"
            assert w["actorder"] == ("group" if ao else None)
        else:
            assert hits == [], name


def test_ct_config_channel_strategy_and_static_groups():
    cfg = ct.ct_quantization_config({"model.layers.0.mlp.down_proj": (8, -1, True, True)},
                                    static_groups=True)
    w = cfg["config_groups"]["group_0"]["weights"]
    assert w["strategy"] == "channel" and w["group_size"] is None and w["actorder"] is None
    w = ct.weights_args(4, 128, True, act_order=True, static_groups=True)
    assert w["actorder"] == "weight"
    exp = get_exporter("compressed-tensors")
    uniform = exp.quantization_config(4, 128, ["lm_head"])
    assert uniform["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_gptq_v1_lifts_zero_points_losslessly():
    """Zero point 0 (e.g. an all-zero padded row) is stored as zero 1 with codes + 1."""
    q = random_q(32, 128, 4, 32, act_order=True)
    q.codes[5] = 0
    q.zeros[5] = 0  # an all-zero row
    q.zeros[7, 1] = 0
    q.codes[7][q.g_idx == 1] = q.codes[7][q.g_idx == 1].clamp(max=14)
    t = gx.gptq_tensors("m", q, "gptq")
    back = gptq_unpack_linear(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], 4, 32)
    assert int(back.zeros.min()) >= 1 and int(back.zeros[5].min()) == 1
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt,bits,gs,act_order,sym", [("gptq", 3, 32, True, False),
                                                       ("gptq", 8, -1, False, True),
                                                       ("compressed-tensors", 4, 64, True, False),
                                                       ("compressed-tensors", 6, -1, False, True)])
def test_linear_from_tensors_inverts_linear_tensors(fmt, bits, gs, act_order, sym):
    """The writer's resume path reads a linear back from its exported tensors alone."""
    q = random_q(64, 128, bits, gs, act_order=act_order, symmetric=sym)
    exp = get_exporter(fmt)
    t = exp.linear_tensors("model.layers.1.mlp.down_proj", q)
    back = exp.linear_from_tensors("model.layers.1.mlp.down_proj", t)
    assert (back.bits, back.group_size) == (bits, gs)
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("bits,sym,act_order", [(3, False, True), (5, False, False),
                                                (6, True, False)])
def test_ct_ragged_widths_pack_densely(bits, sym, act_order):
    """Widths whose bit count is not a multiple of 32 (176 at 3 bits: a padded tiny model)
    pack into ceil(n*bits/32) words, values straddling words, as compressed-tensors does."""
    q = random_q(176, 176, bits, 16, act_order=act_order, symmetric=sym)
    t = ct.ct_tensors("m", q)
    words = -(-176 * bits // 32)
    assert t["m.weight_packed"].shape == (176, words)
    assert t["m.weight_packed"][3].tolist() == ref_pack_lsb_first(q.codes[3].tolist(), bits)
    assert t["m.weight_shape"].tolist() == [176, 176] and t["m.weight_scale"].shape == (176, 11)
    if not sym:
        assert t["m.weight_zero_point"].shape == (words, 11)
        assert t["m.weight_zero_point"][:, 2].tolist() == ref_pack_lsb_first(
            q.zeros[:, 2].tolist(), bits)
    back = get_exporter("compressed-tensors").linear_from_tensors("m", t)
    assert back.bits == bits and back.group_size == 16
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)
