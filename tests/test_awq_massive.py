"""AWQ's clip search and massive activations (issue 20's outlier layer): a random token sample
mostly misses the attention sinks, and clipping then destroys the weights only they use."""
import pytest
import torch

from quantizer.methods.awq_clip import massive_tokens, search_clip, shrink_ratios


def _layer(seed=0, tokens=512, sinks=(0,), per_sample=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g) * 0.02
    w[:, 5] = 0.5 * torch.sign(torch.randn(16, generator=g))  # a column only sinks use
    x = torch.randn(tokens, 64, generator=g)
    x[:, 5] = 0.01 * x[:, 5]
    for s in range(0, tokens, per_sample):
        for p in sinks:
            x[s + p, 5] = 2000.0
    return w, x


def test_massive_tokens_finds_each_sequences_sinks_only():
    _, x = _layer(sinks=(0, 3))
    rows, valid = massive_tokens(x, 128, keep=4)
    assert rows.shape == valid.shape == (4, 4)
    found = set(rows[valid].tolist())
    assert found == {s + p for s in range(0, 512, 128) for p in (0, 3)}
    _, plain = _layer(sinks=())
    assert not massive_tokens(plain, 128)[1].any()


def test_weighted_sample_with_sinks_keeps_their_column_unclipped():
    w, x = _layer()
    ratios = shrink_ratios(20, 0.5)
    normal = x[torch.arange(512) % 128 != 0][:100]
    sinks = x[torch.arange(512) % 128 == 0]
    r_random, _ = search_clip(w, normal, 4, 64, False, ratios)
    # the sample without sinks clips the column the sinks need
    assert float(r_random.min()) < 1.0

    def err(r):
        wc = torch.maximum(torch.minimum(w, r * w.abs().amax(1, keepdim=True)),
                           -r * w.abs().amax(1, keepdim=True))
        from quantizer.methods.awq_clip import fake_quantize_float
        q = fake_quantize_float(wc, 4, 64, False)
        return float((x @ (q - w).t()).square().mean())

    weights = torch.cat([torch.full((100,), 508 / 100), torch.ones(4)])
    r_strat, _ = search_clip(w, torch.cat([normal, sinks]), 4, 64, False, ratios, weights)
    # over all tokens (the objective), the stratified choice is far better
    assert err(r_strat) < 0.2 * err(r_random)


def test_uniform_weights_choose_as_the_plain_mean():
    w, x = _layer()
    ratios = shrink_ratios(20, 0.5)
    a, _ = search_clip(w, x[:200], 4, 64, True, ratios)
    b, _ = search_clip(w, x[:200], 4, 64, True, ratios, torch.full((200,), 3.0))
    assert torch.equal(a, b)


def test_awq_clip_sample_holds_every_sink_with_unbiased_weights():
    from quantizer.methods.registry import get_method
    from test_gptq import tiny_llama_context
    ctx = tiny_llama_context(bits=4)  # 3 chunks x 2 sequences x 32 tokens
    down = next(g[0] for g in ctx.arch.input_groups if g[0].endswith("down_proj"))
    gate = next(g[0] for g in ctx.arch.input_groups if g[0].endswith("gate_proj"))

    def sink(mod, args):  # the first token of every sequence carries a massive channel
        x = args[0].clone()
        x[:, 0, 5] = 500.0
        return (x,)

    ctx.module(down).register_forward_pre_hook(sink)
    awq = get_method("awq", clip_tokens=16)
    sample, weights = awq._sample_inputs(ctx, [gate, down])
    assert weights[gate] is None and len(sample[gate]) == 16  # no massive tokens: as before
    w, x = weights[down], sample[down]
    assert len(w) == len(x)
    assert int((x[:, 5] == 500.0).sum()) == 6  # every sequence's sink, once
    assert float(w.sum()) == pytest.approx(3 * 2 * 32)  # the sample stands for all tokens
    assert torch.all(w[x[:, 5] == 500.0] == 1.0)
