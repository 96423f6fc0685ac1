"""QuantLinear on CPU: every layout equals the canonical dequantize reference and round-trips
through state_dict. No triton needed."""
import random

import pytest
import torch

from quantizer.kernels import packing
from quantizer.kernels.packing import QuantizedWeight
from quantizer.kernels.quant_linear import QuantLinear


def random_quantized(out_f, in_f, bits, group_size, act_order=False, symmetric=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
    maxq = (1 << bits) - 1
    gs = in_f if group_size == -1 else group_size
    ng = in_f // gs
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, ng, generator=g) * 0.02 + 1e-3)
    if symmetric:
        zeros = torch.full((out_f, ng), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (out_f, ng), generator=g).to(torch.int32)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=g)].to(torch.int32)
    # scales must be fp16-representable so every layout stores them exactly
    return QuantizedWeight(codes=codes, scales=scales.half().float(), zeros=zeros, bits=bits,
                           group_size=group_size, g_idx=g_idx, symmetric=symmetric)


CASES = [
    ("awq", 4, 128, False, False),
    ("awq", 4, -1, False, False),
    ("gptq", 4, 64, False, False),
    ("gptq", 4, 64, True, False),
    ("gptq", 3, 32, True, False),
    ("gptq", 2, 64, False, False),
    ("gptq", 8, 32, False, False),
    ("compressed-tensors", 4, 64, False, False),
    ("compressed-tensors", 4, 64, False, True),
    ("compressed-tensors", 8, -1, False, True),
    ("compressed-tensors", 4, 32, True, False),
]


@pytest.mark.parametrize("layout,bits,gs,act_order,sym", CASES)
def test_cpu_forward_matches_canonical(layout, bits, gs, act_order, sym):
    q = random_quantized(64, 256, bits, gs, act_order=act_order, symmetric=sym)
    bias = torch.randn(64)
    m = QuantLinear.from_quantized(q, layout=layout, bias=bias, dtype=torch.float16)
    ref_w = q.dequantize(torch.float64)
    torch.testing.assert_close(m.dequantize(torch.float64), ref_w, rtol=0, atol=0)
    x = torch.randn(5, 3, 256, dtype=torch.float16)
    y = m(x)
    assert y.shape == (5, 3, 64) and y.dtype == torch.float16
    ref = x.double() @ ref_w.t() + bias.half().double()
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 1e-3, rel


@pytest.mark.parametrize("layout,bits,gs,act_order,sym", CASES)
def test_state_dict_round_trip(layout, bits, gs, act_order, sym):
    q = random_quantized(64, 256, bits, gs, act_order=act_order, symmetric=sym)
    m = QuantLinear.from_quantized(q, layout=layout, dtype=torch.float16)
    x = torch.randn(7, 256, dtype=torch.float16)
    y = m(x)
    sd = m.state_dict()
    fresh = QuantLinear(256, 64, bits=bits, group_size=gs, layout=layout, dtype=torch.float16,
                        symmetric=sym, act_order=act_order)
    assert set(fresh.state_dict()) == set(sd)
    for k, v in fresh.state_dict().items():  # the constructor knows the on-disk shapes
        assert v.shape == sd[k].shape and v.dtype == sd[k].dtype, k
    fresh(x)  # populate the kernel cache with the zero weights, then replace them
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(x), y)


def test_awq_buffers_are_the_autoawq_layout():
    q = random_quantized(32, 256, 4, 128)
    m = QuantLinear.from_quantized(q, layout="awq")
    assert m.qweight.shape == (256, 4) and m.qweight.dtype == torch.int32
    assert m.qzeros.shape == (2, 4) and m.scales.shape == (2, 32)
    assert torch.equal(packing.unpack_awq(m.qweight).t(), q.codes.int())


def test_gptq_v1_stores_zero_minus_one():
    q = random_quantized(64, 128, 4, 64)
    v1 = QuantLinear.from_quantized(q, layout="gptq", checkpoint_format="gptq")
    v2 = QuantLinear.from_quantized(q, layout="gptq", checkpoint_format="gptq_v2")
    z1 = packing.unpack_sequential(v1.qzeros, 4, dim=1, size=64)
    z2 = packing.unpack_sequential(v2.qzeros, 4, dim=1, size=64)
    assert torch.equal((z1 + 1) & 15, z2)
    assert torch.equal(v1.dequantize(), v2.dequantize())


def test_wrong_shape_and_device_errors():
    m = QuantLinear.from_quantized(random_quantized(32, 128, 4, 64), layout="awq")
    with pytest.raises(ValueError, match="last dim"):
        m(torch.randn(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="4-bit"):
        QuantLinear(128, 32, bits=3, layout="awq")


def test_cpu_path_works_without_triton():
    """With triton unimportable, QuantLinear imports and runs its CPU path."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from quantizer.kernels.quant_linear import QuantLinear, _triton_ok\n"
        "m = QuantLinear(128, 32, group_size=64)\n"
        "y = m(torch.randn(3, 128, dtype=torch.float16))\n"
        "assert y.shape == (3, 32) and not _triton_ok() and 'triton' not in "
        "{k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
