"""The kernel dispatch: the planes layout, the tuner's exactness gate and choice, the on-disk
tuning cache per GPU kind, split-K arrival counters, and torch tinygemm's mapping of our
asymmetric int4. Kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) or on a GPU;
small shapes. Bounds as in test_kernels_triton.py."""
import json
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from quantizer.kernels import packing, tinygemm, tuning_cache  # noqa: E402
from quantizer.kernels import triton_dispatch as D  # noqa: E402
from quantizer.kernels.quant_linear import KernelWeight, QuantLinear  # noqa: E402
from test_kernels_quant_linear import random_quantized  # noqa: E402

if not (D.interpreting() or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() and not D.interpreting() else "cpu"
GPU = DEV == "cuda"


def weight(N, K, bits=4, gs=128, dtype=torch.float16, **kw):
    q = random_quantized(N, K, bits, gs, **kw)
    return q, KernelWeight(q, dtype, torch.device(DEV))


def reference(x, q, bias=None):
    ref = x.double().cpu() @ q.dequantize(torch.float64).t()
    return ref if bias is None else ref + bias.double().cpu()


def rel(y, ref):
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits,gs,K", [(4, 128, 512), (4, 32, 256), (4, -1, 256), (3, 64, 256),
                                       (2, 64, 256), (8, 32, 128), (4, 48, 192), (4, 20, 160)])
def test_planes_layout_round_trip(bits, gs, K):
    codes = torch.randint(0, 1 << bits, (24, K), dtype=torch.uint8)
    bw = packing.kernel_plane_words(bits, gs, K)
    words = packing.pack_kernel(codes, bits, bw)
    pw = 32 // packing.kernel_container_bits(bits)
    assert words.shape == (24, K // pw) and words.dtype == torch.int32
    assert torch.equal(packing.unpack_kernel(words, bits, bw), codes.int())
    order = packing.kernel_input_order(K, bits, bw)
    assert torch.equal(order.sort().values, torch.arange(K))  # a permutation
    g = K if gs == -1 else gs
    if bw * pw == g:  # every word lies in one group, slot j of a run of words is consecutive
        assert (order.view(-1, pw) // g).unique(dim=1).shape[1] == 1
        run = order.view(-1, pw)[:bw, 1]
        assert torch.equal(run - run[0], torch.arange(bw))


def test_tuner_rejects_an_inexact_path_and_picks_the_fastest_exact_one(monkeypatch):
    q, kw = weight(64, 256)
    real_run = D._Plan.run

    def run(self, x2, kw_, bias):  # the dequant path computes 1% off: it must never be chosen
        y = real_run(self, x2, kw_, bias)
        return y * 1.01 if self.cfg.kind == "dequant" else y
    monkeypatch.setattr(D._Plan, "run", run)
    speed = {"dequant": 1.0, "dot": 2.0, "gemv": 3.0}
    cands = [D.LaunchConfig("gemv", 4, 32, 128, 2), D.LaunchConfig("dot", 16, 32, 128, 1,
                                                                    swap=True),
             D.LaunchConfig("dequant", block_n=32, block_k=128)]
    x = torch.randn(3, 256).half().to(DEV)
    best, results = D.tune(kw, x, None, 3, 4, candidates=cands,
                           timer=lambda plan, *a: speed[plan.cfg.kind])
    assert best.kind == "dot"
    by_kind = {r.config.kind: r for r in results}
    assert math.isinf(by_kind["dequant"].ms) and by_kind["dequant"].err > 5e-3
    assert by_kind["gemv"].ms == 3.0 and by_kind["gemv"].err < 1e-3
    monkeypatch.setattr(D._Plan, "run", real_run)
    assert rel(D.quant_matmul(x, kw, config=best), reference(x, q)) < 1e-3


def test_tuned_choice_is_used_and_keyed_by_shape_and_dtype():
    q, kw = weight(64, 256)
    dkey = D.device_key(torch.device(DEV))
    cfg = D.LaunchConfig("dequant", block_n=32, block_k=128)
    tkey = D.tuning_key(kw, 3, torch.float16, False)
    assert tkey == D.tuning_key(kw, 4, torch.float16, False)  # one M bucket
    assert tkey != D.tuning_key(kw, 3, torch.bfloat16, False)
    assert tkey != D.tuning_key(kw, 5, torch.float16, False)
    D._TUNED[(dkey, tkey)] = cfg
    try:
        x = torch.randn(3, 256).half().to(DEV)
        y = D.quant_matmul(x, kw)
        assert kw.plans[(3, False, None)].cfg == cfg
        assert rel(y, reference(x, q)) < 1e-3
    finally:
        del D._TUNED[(dkey, tkey)]


def test_tuning_cache_is_per_gpu_kind_and_version(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERQUANT_KERNEL_CACHE", str(tmp_path))
    tuning_cache.forget_loaded()
    h100 = ("NVIDIA H100 80GB HBM3", 9, 0, 132)
    h200 = ("NVIDIA H200", 9, 0, 132)
    entry = {"config": D.LaunchConfig("gemv", 1, 128, 128, 8).to_json(), "ms": 0.01}
    tuning_cache.tuning_file(h100).put("M1|N8|K8", entry)
    tuning_cache.forget_loaded()
    assert tuning_cache.tuning_file(h100).get("M1|N8|K8") == entry  # read back from disk
    assert tuning_cache.tuning_file(h200).get("M1|N8|K8") is None  # never another kind's
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and "H100" in files[0]
    assert D.LaunchConfig.from_json(entry["config"]) == D.LaunchConfig("gemv", 1, 128, 128, 8)
    # an H100 file renamed to the H200's name is still refused (device recorded inside)
    tuning_cache.tuning_file(h200).put("other", entry)
    (tmp_path / files[0]).replace(tuning_cache.tuning_file(h200).path)
    tuning_cache.forget_loaded()
    assert tuning_cache.tuning_file(h200).get("M1|N8|K8") is None
    # other versions (torch, triton, kernel source): entries ignored, re-tuned
    path = tuning_cache.tuning_file(h100).path
    tuning_cache.tuning_file(h100).put("k", entry)
    data = json.loads(path.read_text())
    data["versions"]["code"] = "0" * 16
    path.write_text(json.dumps(data))
    tuning_cache.forget_loaded()
    assert tuning_cache.tuning_file(h100).get("k") is None
    tuning_cache.forget_loaded()


@pytest.mark.parametrize("cfg", [D.LaunchConfig("gemv", 1, 32, 64, 4),
                                 D.LaunchConfig("dot", 16, 32, 128, 2, swap=True)])
def test_split_k_counters_reset_between_calls(cfg):
    q, kw = weight(64, 512, gs=64)
    x = torch.randn(2, 512).half().to(DEV)
    b = torch.randn(64).half().to(DEV)
    ys = [D.quant_matmul(x, kw, b, config=cfg) for _ in range(3)]
    plan = kw.plans[(2, True, cfg)]
    assert plan.split > 1 and int(plan.counters.abs().sum()) == 0
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert rel(ys[0], reference(x, q, b)) < 1e-3


def test_tinygemm_mapping_of_asymmetric_int4():
    """(q - z) * s == (q - 8) * s + (8 - z) * s, as torch's CPU int4 kernel computes it with
    our scales_zeros; and the CUDA packing's input byte has the even input in the high nibble."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    q = random_quantized(64, 256, 4, 64)
    for dtype, bound in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        sz = tinygemm.scales_zeros(q.scales.t(), q.zeros.t(), dtype)
        assert sz.shape == (4, 64, 2) and sz.dtype == dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.int(), 1)
        x = torch.randn(3, 256).to(dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
        assert rel(y, reference(x, q)) < bound
    byte = tinygemm.pack_codes(torch.tensor([[3, 12, 5, 0]]))
    assert byte.tolist() == [[0x3C, 0x50]]


def test_tinygemm_eligibility():
    assert not tinygemm.eligible(weight(64, 256, bits=8, gs=32)[1], torch.bfloat16)
    assert not tinygemm.eligible(weight(64, 512, gs=-1)[1], torch.bfloat16)  # G = K > 256
    q, kw = weight(64, 256, gs=64)
    q.g_idx = torch.randint(0, 4, (256,), dtype=torch.int32)  # unequal groups: gathered
    assert not tinygemm.eligible(KernelWeight(q, torch.bfloat16, torch.device(DEV)),
                                 torch.bfloat16)
    assert tinygemm.eligible(kw, torch.bfloat16) == tinygemm.available()


@pytest.mark.skipif(not GPU, reason="torch tinygemm runs on CUDA only")
@pytest.mark.parametrize("act_order", [False, True])
def test_tinygemm_path_is_exact_on_gpu(act_order):
    q = random_quantized(256, 512, 4, 128, act_order=act_order)
    b = torch.randn(256)
    m = QuantLinear.from_quantized(q, layout="gptq", bias=b, dtype=torch.bfloat16).cuda()
    kw = m.kernel_weight(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        if not tinygemm.accepts(kw, dtype):
            assert dtype != torch.bfloat16
            continue
        kwd = m.kernel_weight(dtype)
        x = torch.randn(5, 512, device="cuda", dtype=dtype)
        y = D.quant_matmul(x, kwd, m.bias.to(dtype), config=D.LaunchConfig("tinygemm"))
        assert rel(y, reference(x, q, m.bias.to(dtype))) < D.BOUND[dtype]


@pytest.mark.skipif(not GPU, reason="times kernels with CUDA graphs")
def test_autotune_on_gpu_picks_an_exact_path_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERQUANT_KERNEL_CACHE", str(tmp_path))
    tuning_cache.forget_loaded()
    D.set_autotune(True)
    try:
        q = random_quantized(512, 1024, 4, 128)
        m = QuantLinear.from_quantized(q, layout="awq", dtype=torch.bfloat16).cuda()
        for M in (1, 3, 40):
            x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
            assert rel(m(x), reference(x, q)) < 1e-2
        files = list(tmp_path.iterdir())
        assert len(files) == 1 and len(json.loads(files[0].read_text())["entries"]) == 3
    finally:
        D.set_autotune(False)
        D._TUNED.clear()
        tuning_cache.forget_loaded()


def test_cpu_tensors_are_refused_clearly(monkeypatch):
    q, kw = weight(64, 256)
    kw.device = torch.device("cpu")
    monkeypatch.setattr(D, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a cpu tensor"):
        D.quant_matmul(torch.randn(2, 256).half(), kw)
