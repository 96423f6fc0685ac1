"""The planner on MoE shapes: DeepSeek-V3 (MLA + 256 routed experts, 671B parameters) fits a
modest GPU budget by holding a few experts' state at a time (its weights stay whole: see
the last test)."""
from quantizer.arch import get_arch
from quantizer.plan.sizes import GIB
from quantizer.plan.machine import DeviceSpec
from quantizer.plan.planner import make_plan
from quantizer.plan.shapes import ModelShapes, layer_groups

DEEPSEEK_V3 = dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432,
                   moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                   num_experts_per_tok=8, num_attention_heads=128, num_key_value_heads=128,
                   q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3,
                   num_hidden_layers=61, vocab_size=129280)


def test_deepseek_shapes_name_mla_and_experts():
    s = ModelShapes.from_config(DEEPSEEK_V3)
    assert (s.num_experts, s.moe_layers, s.shared_expert_intermediate) == (256, 58, 2048)
    arch = get_arch("deepseek_v3")
    moe = {g.name: g for g in layer_groups(s, True, arch)}
    assert moe["experts.gate+up"].copies == 256 and moe["experts.down"].in_features == 2048
    q_b = moe["self_attn.q_b_proj"].linears[0]
    assert (q_b.in_features, q_b.out_features) == (1536, 128 * 192)
    dense = {g.name for g in layer_groups(s, False, arch)}
    assert "mlp.down_proj" in dense and "experts.down" not in dense
    # every parameter of a MoE layer is counted: ~11.3B per layer, ~650B over the MoE layers
    per_layer = sum(g.weight_elements() for g in layer_groups(s, True, arch))
    assert 10e9 < per_layer < 12e9


def test_a_deepseek_v3_layer_holds_a_few_experts_at_a_time_and_24_gib_is_refused():
    """A 671B MoE layer's experts' state fits a modest budget a batch at a time; the layer's
    own bf16 weights (21.4 GiB) stay whole on the GPU while `by_group` streaming is not carried
    out, so 24 GiB is refused naming them, and 40 GiB plans."""
    import pytest

    from quantizer.plan.planner import PlanError

    s = ModelShapes.from_config(DEEPSEEK_V3)
    args = (s, "gptq", 128, 512, [DeviceSpec(0, "test GPU")])
    with pytest.raises(PlanError, match="layer weights"):
        make_plan(*args, {0: 24 * GIB}, 256 * GIB, arch=get_arch("deepseek_v3"))
    plan = make_plan(*args, {0: 40 * GIB}, 256 * GIB, arch=get_arch("deepseek_v3"))
    assert plan.predicted_peak[0] <= 40 * GIB
    moe_layer = plan.decisions_for(s.layers - 1)
    assert 0 < moe_layer.experts_per_pass <= 256
    # GPTQ captures expert groups in batches of at most 2 GiB of Hessians (capture_batches):
    # ten 7168² gate/up Hessians, 128 2048² down ones -- what the plan counts
    from quantizer.methods.gptq_memory import hessian_copies
    groups = {g.name: g for g in layer_groups(s, True, get_arch("deepseek_v3"))}
    assert hessian_copies(groups["experts.gate+up"], moe_layer) == 10
    assert hessian_copies(groups["experts.down"], moe_layer) == 128
