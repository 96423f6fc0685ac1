"""End to end on generated checkpoints of every supported architecture:
quantize -> reload -> logits close to the fake-quantized float reference; ppl finite."""
import json
import math

import pytest
import torch

from quantizer import evaluate, load, quantize
from quantizer.methods.rtn import fake_quantize

ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


def fake_quant_reference(model_dir, bits, group_size):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mod.weight.data = fake_quantize(mod.weight.data, bits, group_size)
    return ref


@pytest.mark.parametrize("preset", ARCHS[:1] + [pytest.param(a, marks=pytest.mark.slow)
                                                for a in ARCHS[1:]])  # llama in test-fast
def test_quantize_reload_matches_fake_quant(preset, tiny_checkpoint, tmp_path, prose_file):
    src = tiny_checkpoint(preset)
    out = tmp_path / "q"
    result = quantize(src, out, bits=4, group_size=64, method="rtn", calib_data=str(prose_file),
                      calib_samples=4, calib_seqlen=32, progress=False)
    assert len(result.layers) == 2 and all(r.output_error is not None for r in result.layers)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    model = load(out)
    ref = fake_quant_reference(src, 4, 64)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < 5e-3, rel  # fp16 storage of scales/norms/embeddings is the only difference
    ev = evaluate(out, data=str(prose_file), seqlen=32, max_windows=4, progress=False)
    assert math.isfinite(ev.quant_ppl) and math.isfinite(ev.base_ppl) and ev.kl >= 0


def test_report_renders(tiny_checkpoint, tmp_path):
    result = quantize(tiny_checkpoint("tiny-llama"), tmp_path / "q", method="rtn",
                      calib_samples=0, progress=False)
    text = str(result)
    assert "layer" in text and "g128" in text
    html = result._repr_html_()
    assert "<table>" in html and html.count("<tr>") == 3
    assert json.loads(result.to_json())["group_size"] == 128
