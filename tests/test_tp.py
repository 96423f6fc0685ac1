"""Tensor-parallel alignment: which modules a TP-N deployment cannot load, and the padded
intermediate sizes that fix them. The expected sets below are worked out by hand."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from quantizer.errors import InputError
from quantizer.export.tp import check_tp, padded_intermediate
from quantizer.run.widths import check_tp_targets

GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
EXPERTS = {"experts.gate", "experts.up", "experts.down"}


def dense(intermediate: int, **kw) -> dict:
    # 70B-class attention (64 heads, 8 KV heads, hidden 8192): aligned at every TP ≤ 8, so
    # only the MLP can be flagged.
    cfg = dict(model_type="qwen2", hidden_size=8192, num_attention_heads=64,
               num_key_value_heads=8, num_hidden_layers=4, vocab_size=152064,
               intermediate_size=intermediate)
    cfg.update(kw)
    return cfg


# Qwen3-30B-A3B's published shape: 128 experts of width 768.
QWEN3_MOE = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 num_hidden_layers=48, vocab_size=151936, decoder_sparse_step=1,
                 mlp_only_layers=[])

# Per GPU, g128: column layers (gate/up) need out/tp % 64, row layers (down) in/tp % 128.
#   14784: /2 = 7392 (%64 = 32, %128 = 96)  /4 = 3696 (48, 112)  /8 = 1848 (56, 56)
#   29568: /2 = 14784 (%64 = 0, %128 = 64)  /4 = 7392 (32, 96)   /8 = 3696 (48, 112)
#   10944: /2 = 5472 (32, 96)               /4 = 2736 (48, 48)   /8 = 1368 (24, 88)
#   28672 (Llama-2-70B): /8 = 3584 = 28 × 128 — aligned everywhere.
ALL = {GATE, UP, DOWN}
EXPECTED_DENSE = {
    (14784, 2): ALL, (14784, 4): ALL, (14784, 8): ALL,
    (29568, 2): {DOWN}, (29568, 4): ALL, (29568, 8): ALL,
    (10944, 2): ALL, (10944, 4): ALL, (10944, 8): ALL,
    (28672, 2): set(), (28672, 4): set(), (28672, 8): set(),
}
# Smallest width whose share per GPU is a multiple of 128: round up to 128·tp.
#   14784 → 256·58 = 14848, 512·29 = 14848, 1024·15 = 15360
#   29568 → 256·116 = 29696, 512·58 = 29696, 1024·29 = 29696 (Qwen's published 72B fix)
#   10944 → 256·43 = 11008, 512·22 = 11264, 1024·11 = 11264
EXPECTED_PADDED = {
    (14784, 2): 14848, (14784, 4): 14848, (14784, 8): 15360,
    (29568, 2): 29696, (29568, 4): 29696, (29568, 8): 29696,
    (10944, 2): 11008, (10944, 4): 11264, (10944, 8): 11264,
    (28672, 2): 28672, (28672, 4): 28672, (28672, 8): 28672,
}
# Experts, fused-MoE Marlin needs (768/tp) % max(64, g):
#   g128: /2 = 384 ok, /4 = 192 (%128 = 64), /8 = 96      g64: 192 ok, 96 (%64 = 32)
EXPECTED_MOE = {(2, 128): set(), (4, 128): EXPERTS, (8, 128): EXPERTS,
                (2, 64): set(), (4, 64): set(), (8, 64): EXPERTS}


@pytest.mark.parametrize("intermediate,tp", sorted(EXPECTED_DENSE))
def test_dense_flags_exactly_the_misaligned(intermediate, tp):
    problems = check_tp(dense(intermediate), None, tp, 128)
    assert {p.module for p in problems} == EXPECTED_DENSE[intermediate, tp]
    for p in problems:
        assert p.fixable_by_padding and f"--pad-for-tp {tp}" in p.message
        assert p.module in p.message and str(intermediate // tp) in p.message
        assert f"{intermediate} → {EXPECTED_PADDED[intermediate, tp]}" in p.message


@pytest.mark.parametrize("intermediate,tp", sorted(EXPECTED_PADDED))
def test_padded_sizes_are_minimal_and_pass(intermediate, tp):
    width = padded_intermediate(intermediate, tp, 128)
    assert width == EXPECTED_PADDED[intermediate, tp]
    assert check_tp(dense(width), None, tp, 128) == []


@pytest.mark.parametrize("tp,group", sorted(EXPECTED_MOE))
def test_moe_expert_width_768(tp, group):
    problems = check_tp(QWEN3_MOE, None, tp, group)
    assert {p.module for p in problems} == EXPECTED_MOE[tp, group]
    if problems:
        assert all("moe_intermediate_size 768 →" in p.message for p in problems)
    padded = dict(QWEN3_MOE, moe_intermediate_size=padded_intermediate(768, tp, group))
    assert check_tp(padded, None, tp, group) == []


def test_moe_padded_widths():
    assert [padded_intermediate(768, tp, 128) for tp in (2, 4, 8)] == [768, 1024, 1024]


def test_mixtral_experts_use_intermediate_size():
    mixtral = dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                   num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                   vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)
    assert check_tp(mixtral, None, 8, 128) == []  # 14336 / 8 = 1792 = 14 × 128
    odd = dict(mixtral, intermediate_size=14000)  # 14000 / 2 = 7000: not a multiple of 128
    problems = check_tp(odd, None, 2, 128)
    assert {p.module for p in problems} == EXPERTS
    assert "intermediate_size 14000 → 14080" in problems[0].message


def test_group_size_and_per_channel():
    # 10944 % 128 = 64: even a single GPU fails Marlin's min_thread_k on down_proj, whatever
    # the group size; 11136 = 87 × 128 passes with g128 but not g256 (11136 / 256 = 43.5).
    for group in (128, 64, 32):
        (p,) = check_tp(dense(10944), None, 1, group)
        assert p.module == DOWN and "min_thread_k 128" in p.message
    assert check_tp(dense(11136), None, 1, 128) == []
    assert {p.module for p in check_tp(dense(11136), None, 1, 256)} == {DOWN}
    # Per channel (-1) keeps only Marlin's 128: 29568 / 2 = 14784 = 115.5 × 128.
    assert {p.module for p in check_tp(dense(29568), None, 2, -1)} == {DOWN}
    assert padded_intermediate(29568, 2, -1) == 29696


def test_heads_that_do_not_split_are_not_fixable():
    problems = check_tp(dense(28672, num_attention_heads=40, hidden_size=5120), None, 3, 128)
    attention = [p for p in problems if p.module == "attention"]
    assert attention and not any(p.fixable_by_padding for p in attention)
    assert any("40 attention heads" in p.message for p in attention)
    # KV heads replicate when TP is a multiple of them, and must otherwise divide.
    assert check_tp(dense(28672, num_key_value_heads=2), None, 8, 128) == []
    kv = check_tp(dense(28672, num_attention_heads=48, hidden_size=6144,
                        num_key_value_heads=6), None, 4, 128)
    assert [p.module for p in kv] == ["attention"] and "6 KV heads" in kv[0].message
    # the gate a run passes before any work (run/widths.py)
    with pytest.raises(InputError, match="TP 3"):
        check_tp_targets(dense(28672, num_attention_heads=40, hidden_size=5120), None,
                         SimpleNamespace(tp_size=3, pad_for_tp=None), None, 128)
    assert check_tp_targets(dense(28672), None, SimpleNamespace(tp_size=8, pad_for_tp=None),
                            None, 128) == ["TP-8: ok (every quantized module's per-GPU shape "
                                           "aligned at g128)"]


def _misaligned_by_rule(intermediate: int, tp: int, group: int) -> set[str]:
    """The rule restated independently: what vLLM's Marlin checks reject."""
    bad = set()
    if intermediate % tp or (intermediate // tp) % 64:
        bad |= {GATE, UP}
    k_align = math.lcm(group, 128) if group > 0 else 128
    if intermediate % tp or (intermediate // tp) % k_align:
        bad.add(DOWN)
    return bad


def test_random_widths_match_the_rule_and_padding_fixes_them(rng_seed):
    seed = rng_seed  # the per-test seed (conftest), named on failure
    rng = random.Random(seed)
    for _ in range(60):
        width = rng.randrange(64, 40000)
        tp, group = rng.choice([1, 2, 4, 8]), rng.choice([32, 64, 128, -1])
        got = {p.module for p in check_tp(dense(width), None, tp, group)}
        assert got == _misaligned_by_rule(width, tp, group), (seed, width, tp, group)
        padded = padded_intermediate(width, tp, group)
        unit = (math.lcm(group, 128) if group > 0 else 128) * tp
        assert width <= padded < width + unit and padded % unit == 0, (seed, width, tp)
        assert check_tp(dense(padded), None, tp, group) == [], (seed, width, tp, group)


def test_bad_arguments():
    with pytest.raises(InputError):
        check_tp(dense(14336), None, 0, 128)
    with pytest.raises(InputError):
        padded_intermediate(0, 2, 128)
