"""Every Triton kernel path against a float64 dequant reference, run on CPU by Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported). Small shapes: the
interpreter is slow. Skips cleanly when triton is not installed.

Bounds (||y - ref|| / ||ref||): fp16 1e-3; bf16 1e-2 (bf16 keeps 8 mantissa bits, so the
weight and output roundings alone are ~2e-3 each)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from quantizer.kernels.quant_linear import QuantLinear  # noqa: E402
from quantizer.kernels import triton_dispatch as D  # noqa: E402
from test_kernels_quant_linear import random_quantized  # noqa: E402

if not (D.interpreting() or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() and not D.interpreting() else "cpu"
BOUND = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def run_case(layout, bits, gs, M, N, Kdim, cfg, dtype=torch.float16, act_order=False,
             bias=True, x_scale=1.0, sym=False):
    q = random_quantized(N, Kdim, bits, gs, act_order=act_order, symmetric=sym)
    b = torch.randn(N) if bias else None
    m = QuantLinear.from_quantized(q, layout=layout, bias=b, dtype=dtype).to(DEV)
    kw = m.kernel_weight(dtype)
    x = (torch.randn(M, Kdim) * x_scale).to(dtype).to(DEV)
    ref = x.double().cpu() @ q.dequantize(torch.float64).t()
    if b is not None:
        ref += m.bias.double().cpu()
    plan = D._Plan(kw, M, cfg, b is not None)
    # poison: every output element must be written by the kernel
    out = plan.run(x, kw, m.bias)
    assert torch.isfinite(out).all()
    y = D.quant_matmul(x, kw, m.bias, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel <= BOUND[dtype], (layout, bits, gs, M, cfg, rel)
    return y


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty inside the launch path returns NaN-filled memory, so any output or
    workspace element the kernels fail to write shows up as NaN."""
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(D.torch, "empty", nan_empty)


GEMV = D.LaunchConfig("gemv", 1, 32, 64, 1)
GEMV_SPLIT = D.LaunchConfig("gemv", 1, 64, 32, 2)
GEMV_ROWS = D.LaunchConfig("gemv", 4, 64, 64, 2)  # 4 rows per program, M=5 -> 2 row blocks
GEMV_PREFETCH = D.LaunchConfig("gemv", 2, 64, 64, 2, prefetch=True)
DOT = D.LaunchConfig("dot", 16, 32, 128, 1)
DOT_SPLIT = D.LaunchConfig("dot", 16, 64, 128, 2)
DOT_SWAP = D.LaunchConfig("dot", 16, 64, 128, 2, swap=True)
DEQ = D.LaunchConfig("dequant", block_n=32, block_k=32)


@pytest.mark.parametrize("cfg", [GEMV, GEMV_SPLIT, GEMV_ROWS, GEMV_PREFETCH, DOT, DOT_SPLIT,
                                 DOT_SWAP, DEQ])
@pytest.mark.parametrize("layout,bits,gs", [("awq", 4, 32), ("gptq", 4, 64)])
def test_paths_4bit(cfg, layout, bits, gs):
    M = (1 if cfg.block_m == 1 else 5) if cfg.kind == "gemv" else 17  # odd M
    run_case(layout, bits, gs, M, 64, 192, cfg)  # K=192: 3 groups of 64 / 6 of 32


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("cfg", [GEMV, GEMV_ROWS, DOT_SPLIT, DOT_SWAP])
def test_other_bits(bits, cfg):
    M = (1 if cfg.block_m == 1 else 5) if cfg.kind == "gemv" else 5
    run_case("gptq", bits, 32, M, 64, 128, cfg)


@pytest.mark.parametrize("cfg", [GEMV_SPLIT, GEMV_ROWS, DOT, DOT_SWAP, DEQ])
def test_act_order_gptq(cfg):
    M = (1 if cfg.block_m == 1 else 3) if cfg.kind == "gemv" else 3
    run_case("gptq", 4, 32, M, 64, 128, cfg, act_order=True)


def test_nonuniform_g_idx_uses_gathered_groups():
    q = random_quantized(64, 128, 4, 32)
    q.g_idx = torch.randint(0, 4, (128,), dtype=torch.int32)  # unequal group sizes
    m = QuantLinear.from_quantized(q, layout="gptq").to(DEV)
    kw = m.kernel_weight(torch.float16)
    assert kw.g_idx is not None and kw.perm is None
    x = torch.randn(3, 128).half().to(DEV)
    ref = x.double().cpu() @ q.dequantize(torch.float64).t()
    for cfg in (GEMV, DOT):
        xin = x[:1] if cfg.kind == "gemv" else x
        y = D.quant_matmul(xin, kw, config=cfg).double().cpu()
        assert (y - ref[: len(xin)]).norm() / ref[: len(xin)].norm() < 1e-3


@pytest.mark.parametrize("cfg", [GEMV, DOT_SPLIT])
def test_bf16(cfg):
    if cfg.kind != "gemv" and D.interpreting():
        pytest.skip("Triton's CPU interpreter miscomputes bf16 tl.dot and int->bf16 casts "
                    "(a plain bf16 tl.dot is off by 1e10 there); this case runs on the GPU")
    run_case("compressed-tensors", 4, 64, 1 if cfg.kind == "gemv" else 7, 64, 128, cfg,
             dtype=torch.bfloat16, sym=True)


@pytest.mark.parametrize("cfg", [GEMV, DOT])
def test_per_channel_group_and_ct_layout(cfg):
    run_case("compressed-tensors", 4, -1, 1 if cfg.kind == "gemv" else 9, 128, 96, cfg)


@pytest.mark.parametrize("cfg", [GEMV_SPLIT, DOT_SWAP])
def test_n_not_a_multiple_of_the_tile(cfg):
    run_case("awq", 4, 64, 1 if cfg.kind == "gemv" else 19, 72, 128, cfg)  # N = 72


@pytest.mark.parametrize("cfg", [GEMV, DOT_SPLIT, DEQ])
def test_large_activations_do_not_overflow(cfg):
    """x near the fp16 limit: partial sums exceed 65504 but stay in fp32; output fits."""
    q = random_quantized(64, 128, 4, 32)
    # small but normal fp16 scales keep the true output representable in fp16
    q.scales = (torch.rand_like(q.scales) * 1e-3 + 1e-4).half().float()
    m = QuantLinear.from_quantized(q, layout="awq").to(DEV)
    kw = m.kernel_weight(torch.float16)
    M = 1 if cfg.kind == "gemv" else 4
    x = (torch.rand(M, 128) * 2 - 1) * 60000
    x = x.half().to(DEV)
    y = D.quant_matmul(x, kw, config=cfg)
    ref = x.double().cpu() @ q.dequantize(torch.float64).t()
    assert ref.abs().max() < 60000
    assert torch.isfinite(y).all()
    assert ((y.double().cpu() - ref).norm() / ref.norm()) < 1e-3


def test_default_plans_and_deterministic():
    q = random_quantized(128, 256, 4, 128)
    m = QuantLinear.from_quantized(q, layout="awq").to(DEV)
    kw = m.kernel_weight(torch.float16)
    for M in (1, 2, 3):
        x = torch.randn(M, 256).half().to(DEV)
        y1, y2 = D.quant_matmul(x, kw), D.quant_matmul(x, kw)
        assert torch.equal(y1, y2)
        ref = x.double().cpu() @ q.dequantize(torch.float64).t()
        assert (y1.double().cpu() - ref).norm() / ref.norm() < 1e-3


def test_input_checks():
    m = QuantLinear.from_quantized(random_quantized(64, 128, 4, 32), layout="awq").to(DEV)
    kw = m.kernel_weight(torch.float16)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        D.quant_matmul(torch.randn(2, 128).to(DEV), kw)
    with pytest.raises(ValueError, match="in_features"):
        D.quant_matmul(torch.randn(2, 64).half().to(DEV), kw)
    with pytest.raises(ValueError, match="contiguous"):
        D.quant_matmul(torch.randn(128, 2).half().to(DEV).t(), kw)
    with pytest.raises(ValueError, match="bias"):
        D.quant_matmul(torch.randn(2, 128).half().to(DEV), kw, torch.randn(3).half().to(DEV))
