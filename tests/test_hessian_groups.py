"""GPTQ's Hessian on a GPU multiplies groups of samples gathered whatever the chunking
(methods/gptq_hessian.py): the same bits for any chunk size and shard cut, the same values as
one product per sample up to float32 rounding. Run here on the CPU by forcing the gathering
path (the GPU GEMMs themselves are measured by benchmarks/bench_speed.py)."""
import random

import pytest
import torch

from quantizer.methods import gptq_hessian as gh


@pytest.fixture
def gathering(monkeypatch):
    monkeypatch.setattr(gh.HessianAccumulator, "_gathers", lambda self, x: x.numel() > 0)
    monkeypatch.setattr(gh, "GRAM_SCRATCH_BYTES", 3 * 16 * 64 * 6)  # 3 samples per product


def accumulate(samples: torch.Tensor, cuts: list[int]) -> gh.HessianAccumulator:
    acc = gh.HessianAccumulator(samples.shape[-1])
    start = 0
    for cut in [*cuts, len(samples)]:
        if cut > start:
            acc.add(samples[start:cut])
        start = cut
    return acc


def test_group_size_is_a_function_of_the_widths_only():
    assert gh.gram_group_samples(11008, 512, 2, "addmm") == 5
    assert gh.gram_group_samples(11008, 512, 2, "tf32") == 1
    assert gh.gram_group_samples(4096, 512, 2, "addmm") == 8
    assert gh.gram_group_samples(28672, 512, 2, "addmm") == 2
    # the planner's term: never below one sample in fp32, at most the scratch bound
    for n in (2048, 4096, 11008, 28672):
        b = gh.hessian_update_bytes(n, 512, 2, True)
        assert 512 * n * 4 <= b <= max(512 * n * 4, gh.GRAM_SCRATCH_BYTES)
    assert gh.hessian_update_bytes(4096, 512, 4, True) == 512 * 4096 * 4
    assert gh.hessian_update_bytes(4096, 512, 2, False) == 512 * 4096 * 4


@pytest.mark.parametrize("seed", range(5))
def test_gathered_groups_are_the_same_bits_for_any_chunking(gathering, seed):
    rng = random.Random(seed)
    samples = (torch.randn(11, 16, 64, generator=torch.Generator().manual_seed(seed))
               .to(torch.bfloat16))
    ref = accumulate(samples, [])
    assert ref.n_tokens == 11 * 16
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, 11), rng.randint(1, 6)))
        got = accumulate(samples, cuts)
        assert got.n_tokens == ref.n_tokens
        assert torch.equal(got.H, ref.H)
    # one product per sample (the CPU path): the same values up to float32 rounding
    per_sample = gh.HessianAccumulator(64)
    for s in samples:
        per_sample._add_rows(s)
    torch.testing.assert_close(ref.H, per_sample.H, rtol=1e-5, atol=1e-6)
    want = 2 * samples.double().reshape(-1, 64).t() @ samples.double().reshape(-1, 64) / (11 * 16)
    torch.testing.assert_close(ref.H.double(), want, rtol=1e-5, atol=1e-6)


def test_shard_fold_flushes_partial_groups(gathering):
    """Per-shard partials end mid-group; merging and reading H multiply what is gathered."""
    samples = torch.randn(8, 16, 64).to(torch.float16)
    a, b = accumulate(samples[:5], []), accumulate(samples[5:], [1])
    a.merge(b)
    whole = accumulate(samples, [])
    torch.testing.assert_close(a.H, whole.H, rtol=1e-5, atol=1e-6)
    assert a.n_tokens == 8 * 16
    state = accumulate(samples[:4], [2]).state()  # what a rank sends: flushed
    assert int(state[1]) == 4 * 16 and state[0].abs().sum() > 0


def test_the_cpu_path_is_one_float32_product_per_sample():
    samples = torch.randn(3, 8, 32).to(torch.bfloat16)
    acc = gh.HessianAccumulator(32)
    acc.add(samples)
    ref2 = torch.zeros(32, 32)
    n = 0
    for s in samples:
        x = s.float()
        ref2.addmm_(x.t(), x, beta=n / (n + 8), alpha=2.0 / (n + 8))
        n += 8
    assert torch.equal(acc.H, ref2)
