"""`quantize plan` on the published configs of DeepSeek-V3, Kimi-K2, Qwen3-235B-A22B and
GLM-4.6 (tests/data/configs, sources in its README) with one 80 GB GPU and 64 GiB of host
RAM; the speed model's coefficients come from the measured runs it names."""
import json
from pathlib import Path

import pytest

from quantizer.plan.sizes import GIB
from helpers import plan_text
from quantizer.plan.machine import DeviceSpec
from quantizer.plan.memory import host_facts
from quantizer.plan.planner import make_plan
from quantizer.plan.shapes import ModelShapes
from quantizer.plan.speed import COEFFICIENTS, MEASURED, fit, measured_seconds, model_seconds

CONFIGS = Path(__file__).with_name("data") / "configs"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
GIANTS = ("deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "glm-4.6")


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def plan(name: str, method: str, vram=80 * GIB, ram=64 * GIB):
    cfg = config(name)
    shapes = ModelShapes.from_config(cfg)
    host = host_facts(shapes, 2, False, cfg)
    return make_plan(shapes, method, 128, 512, [DeviceSpec(0, "H100")], {0: vram}, ram,
                     host=host)


def test_published_shapes():
    ds = ModelShapes.from_config(config("deepseek-v3"))
    assert (ds.layers, ds.moe_layers, ds.num_experts, ds.mla[:2]) == (61, 58, 256, (1536, 512))
    kimi = ModelShapes.from_config(config("kimi-k2"))
    assert (kimi.moe_layers, kimi.num_experts, kimi.heads) == (60, 384, 64)
    qwen = ModelShapes.from_config(config("qwen3-235b-a22b"))
    assert (qwen.moe_layers, qwen.num_experts, qwen.kv_heads) == (94, 128, 4)
    glm = ModelShapes.from_config(config("glm-4.6"))  # DeepSeek-style experts, GQA attention
    assert (glm.moe_layers, glm.num_experts, glm.shared_expert_intermediate, glm.mla) == (
        89, 160, 1536, ())


@pytest.mark.parametrize("name", GIANTS)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_giants_fit_one_80g_gpu_and_64g_of_host_ram(name, method):
    p = plan(name, method)
    assert p.predicted_peak[0] <= 80 * GIB and p.ram_peak <= 64 * GIB
    text = p.format()
    for part in ("memory plan per layer kind", "disk beside the checkpoint", "time on one GPU",
                 "host RAM"):
        assert part in text, part


def test_fp8_originals_are_read_at_one_byte_per_weight():
    """DeepSeek-V3 and Kimi-K2 ship FP8: the layer read ahead costs ~1 byte per weight of host
    RAM, half of a bf16 checkpoint's."""
    for name in ("deepseek-v3", "kimi-k2"):
        cfg = config(name)
        facts = host_facts(ModelShapes.from_config(cfg), 2, False, cfg)
        assert 1.0 <= facts.stored_per_weight < 1.001 and "FP8" in facts.stored_label
    bf16 = host_facts(ModelShapes.from_config(config("glm-4.6")), 2, False, config("glm-4.6"))
    assert bf16.stored_per_weight == 2.0


def test_deepseek_v3_gptq_is_feasible_on_an_h100_in_under_12_hours():
    p = plan("deepseek-v3", "gptq")
    staged = dict(p.ram_breakdown)
    assert any("read ahead as stored, 1.00 bytes/weight" in k for k in staged)
    t = model_seconds(p.shapes, "gptq", 128 * 512)
    assert t["total"] < 12 * 3600
    assert t["moe"] > 5 * t["dense"]  # 256 experts: the units dominate


def test_too_little_host_ram_is_refused_naming_what_does_not_fit():
    from quantizer.plan.planner import PlanError

    with pytest.raises(PlanError, match="host RAM: no plan fits --ram-budget 16.0 GiB"):
        plan("deepseek-v3", "gptq", ram=16 * GIB)


def test_plan_command_prints_the_tables_of_every_family():
    # GLM-4.6 and Kimi-K2 (DeepSeek-V3's architecture under its own model_type) are families
    # since structure discovery (issue 19): their plans name their own layers
    text = plan_text(CONFIGS / "glm-4.6.json", 4, "gptq", "80G", "64G")
    assert "no model family" not in text and "plan for glm4_moe" in text
    text = plan_text(CONFIGS / "kimi-k2.json", 4, "awq", "80G", "64G")
    assert "no model family" not in text and "moe" in text
    assert "FP8 e4m3, 128x128 block scales" in text
    text = plan_text(CONFIGS / "deepseek-v3.json", 4, "gptq", "80G", "64G")
    assert "no model family" not in text and "dense" in text and "moe" in text


def test_speed_model_is_the_fit_of_the_measured_runs():
    for m in MEASURED:
        assert measured_seconds(m, RESULTS) == pytest.approx(m.seconds, abs=1e-3), m
    refit = fit(RESULTS)
    for method, coef in COEFFICIENTS.items():
        assert refit[method] == pytest.approx(coef, rel=1e-3), method
    # and the model reproduces what it was fitted to within 12%
    from quantizer.plan.speed import layer_seconds
    from quantizer.demo.synthetic import PRESETS
    for m in MEASURED:
        t = layer_seconds(ModelShapes.from_config(dict(PRESETS[m.preset])), m.method, m.moe,
                          128 * 512)
        assert t == pytest.approx(m.seconds, rel=0.12), (m, t)
