"""Structure discovery (quantizer/arch): specs read off transformers' own layers, the norm
fold kinds, the fold probe, on-disk names, per-layer kwargs. No weights are read; each test
builds configs or tiny modules in memory."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantizer.arch import ScaleGroup, get_arch, model_arch
from quantizer.arch.folds import fold_into, norm_fold_kind, probe
from quantizer.errors import InputError

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LLAMA_SCALES = (  # the hand-written Llama spec before discovery (its v -> o had a condition)
    ("input_layernorm", LLAMA_GROUPS[0], "self_attn"),
    ("self_attn.v_proj", LLAMA_GROUPS[1], "self_attn.o_proj"),
    ("post_attention_layernorm", LLAMA_GROUPS[2], "mlp"),
    ("mlp.up_proj", LLAMA_GROUPS[3], "mlp.down_proj"),
)


def small(model_type, **kw):
    base = dict(model_type=model_type, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                vocab_size=256)
    base.update(kw)
    return base


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_families_discover_the_hand_written_spec(model_type):
    spec = model_arch(small(model_type)).for_layer(None, 0)
    assert spec.input_groups == LLAMA_GROUPS
    assert [(g.prev, g.linears, g.judge) for g in spec.scale_groups] == list(LLAMA_SCALES)
    assert spec.fold_kinds == (("input_layernorm", "scale"), ("post_attention_layernorm",
                                                              "scale"))


def test_moe_and_mla_structure():
    mixtral = model_arch(small("mixtral", num_local_experts=4, num_experts_per_tok=2))
    moe = mixtral.moe
    assert (moe.block, moe.disk_block, moe.expert_linears, moe.num_experts) == (
        "mlp", "block_sparse_moe", ("w1", "w3", "w2"), 4)
    spec = mixtral.for_layer(None, 0)
    norm = next(g for g in spec.scale_groups if g.prev == "post_attention_layernorm")
    assert norm.also_scale == ("block_sparse_moe.gate",) and norm.stat == "block_sparse_moe"
    ds = model_arch(small("deepseek_v3", q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                          num_experts_per_tok=2, n_group=1, topk_group=1,
                          moe_intermediate_size=32, n_shared_experts=1,
                          first_k_dense_replace=1))
    assert [ds.is_moe_layer(None, i) for i in range(2)] == [False, True]
    dense = ds.for_layer(None, 0)
    assert ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa") in dense.input_groups
    assert {g.prev for g in dense.scale_groups} >= {"self_attn.q_a_layernorm",
                                                     "self_attn.kv_a_layernorm"}
    assert ds.moe.shared == "shared_experts" and ds.moe.router == "gate"


def test_gemma_norms_fold_as_offset_and_post_norms_are_not_producers():
    spec = model_arch(small("gemma2", head_dim=16)).for_layer(None, 0)
    assert dict(spec.fold_kinds) == {"input_layernorm": "offset",
                                     "pre_feedforward_layernorm": "offset"}
    assert {g.prev for g in spec.scale_groups} == {
        "input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"}


def test_parallel_attention_and_mlp_share_one_group_judged_on_the_layer():
    spec = model_arch(small("cohere")).for_layer(None, 0)
    first = spec.scale_groups[0]
    assert first.prev == "input_layernorm" and first.judge == ""
    assert set(first.linears) >= {"self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"}


class _Norm(nn.Module):
    def __init__(self, n, offset=False, bias=False, mix=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.offset, self.mix = offset, mix

    def forward(self, x):
        y = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        w = (1 + self.weight) if self.offset else self.weight
        if self.mix:  # a weight that does not act per channel
            w = w.mean()
        return y * w + (self.bias if self.bias is not None else 0)


@pytest.mark.parametrize("norm,kind", [
    (_Norm(8), "scale"), (_Norm(8, offset=True), "offset"), (nn.LayerNorm(8), "scale"),
    (_Norm(8, bias=True), "scale"), (_Norm(8, mix=True), None)])
def test_norm_fold_kinds_and_the_fold_is_exact(norm, kind):
    assert norm_fold_kind(norm) == kind
    if kind is None:
        return
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape))
        x = torch.randn(5, 8)
        ref = norm(x)
        s = torch.exp(torch.randn(8))
        fold_into(norm, kind, s)
        torch.testing.assert_close(norm(x) * s, ref, rtol=1e-5, atol=1e-5)


def test_norm_fold_kind_works_on_meta_modules():
    assert norm_fold_kind(nn.LayerNorm(8, device="meta")) == "scale"


class _Block(nn.Module):
    """up -> down through a clamp: folding scales across it is not exact."""

    def __init__(self, clamp: bool):
        super().__init__()
        self.up, self.down, self.clamp = nn.Linear(8, 16), nn.Linear(16, 8), clamp

    def forward(self, x):
        h = self.up(x)
        return self.down(h.clamp(-0.05, 0.05) if self.clamp else 3 * h)


@pytest.mark.parametrize("clamp", [False, True])
def test_probe_tells_linear_paths_from_nonlinear_ones(clamp):
    torch.manual_seed(0)
    block = _Block(clamp)
    problem = probe(block, ScaleGroup("up", ("down",), judge="down"), torch.randn(1, 4, 8), {})
    assert (problem is None) == (not clamp)
    if clamp:
        assert "not exact" in problem


def test_qwen2_vl_names_on_disk_and_in_memory():
    cfg = json.loads(open("tests/data/configs/Qwen2-VL-72B-Instruct/config.json").read())
    arch = model_arch(cfg)
    assert arch.mem_layers == "model.language_model.layers"
    assert arch.layers_prefix == "model.layers"  # the published checkpoint's names
    assert arch.kept_modules == ("visual",)
    assert arch.not_converted("awq") == ["lm_head", "visual"]
    assert arch.not_converted("compressed-tensors") == ["lm_head", r"re:.*visual\..*"]
    # a transformers-5 checkpoint (model.language_model.*) keeps its own names too
    disk = ["model.language_model.layers.0.mlp.down_proj.weight", "model.visual.merger.x"]
    arch5 = model_arch(cfg, disk + ["lm_head.weight"])
    assert arch5.layers_prefix == "model.language_model.layers"
    assert arch5.split_non_layer(["model.visual.merger.x", "lm_head.weight"]) == (
        ["lm_head.weight"], ["model.visual.merger.x"])


def test_gemma2_layers_get_their_own_masks():
    """Sliding and full attention layers: the model's own forward gives each its mask."""
    from quantizer.arch.meta import build_meta, capture_layer_calls, config_from_dict

    cfg = config_from_dict(small("gemma2", head_dim=16, sliding_window=4))
    model = build_meta(cfg)
    from quantizer.arch.meta import decoder_layers, materialise_buffers
    from quantizer.arch.model import _materialise_small
    path, layers = decoder_layers(model)
    materialise_buffers(model, "cpu", skip=path)
    _materialise_small(model, path)
    _, calls = capture_layer_calls(model, layers, torch.zeros(1, 8, dtype=torch.long),
                                   zero_embeddings=True)
    masks = [c.get("attention_mask") for c in calls]
    assert masks[0] is not None and masks[1] is not None
    assert not torch.equal(masks[0], masks[1])  # layer 0 slides, layer 1 sees everything


def test_refusals_say_what_is_missing():
    with pytest.raises(InputError, match="unsupported architecture 'gpt2': .*Conv1D"):
        model_arch(dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    with pytest.raises(InputError, match="unsupported architecture 'gpt_oss': .*fused"):
        get_arch("gpt_oss")
    with pytest.raises(InputError, match="unsupported architecture 'nope'"):
        model_arch({"model_type": "nope"})


def test_kimi_k2_is_deepseek_v3():
    cfg = small("kimi_k2", q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1)
    arch = model_arch(cfg)
    assert arch.name == "deepseek_v3" and arch.moe.num_experts == 4
