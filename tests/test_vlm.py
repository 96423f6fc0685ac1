"""Vision-language models: the Qwen2-VL seed case end to end on a small Qwen2-VL.

Qwen2-VL-72B's MLP width 29568 gives 14784 per GPU at TP 2 and 7392 at TP 4, neither a
multiple of 128 (tests/data/configs/Qwen2-VL-72B-Instruct): the published AWQ release pads it
to 29696. The small model's width 1408 splits the same way (704 and 352 per GPU), so
--pad-for-tp must pad it (to 1536, as 29568 goes to 29696); the text decoder alone is
quantized, the vision tower is copied in its original dtype under the checkpoint's own names (`visual.*`, `model.layers.*`, as Qwen's release
names them, not transformers 5's `model.visual.*` / `model.language_model.*`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import family_zoo as zoo
from quantizer import load, quantize
from quantizer.errors import InputError
from quantizer.export.tp import check_checkpoint, check_tp, padded_intermediate
from quantizer.plan.shapes import ModelShapes

CONFIGS = Path(__file__).parent / "data" / "configs"


def tiny_qwen2_vl_config():
    """The small Qwen2-VL's config: hidden 512, MLP width 1408 (see tiny_qwen2_vl)."""
    from quantizer.arch import tiny

    cfg = tiny.tiny_config("qwen2_vl")
    text = cfg.text_config
    text.hidden_size, text.intermediate_size, text.head_dim = 512, 1408, 64
    text.num_attention_heads, text.num_key_value_heads = 8, 2
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [8, 12, 12]}  # head_dim/2
    cfg.vision_config.hidden_size = 512  # the merger writes text-width tokens
    return cfg


def tiny_qwen2_vl(out: Path, dtype=torch.bfloat16) -> Path:
    """A small Qwen2-VL in bfloat16 (hidden 512, MLP width 1408: 704 and 352 per GPU at TP 2
    and 4, as 29568 gives 14784 and 7392), written by transformers."""
    from quantizer.arch.meta import model_class

    cfg = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    model = model_class(cfg)._from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p + 0.1 * torch.randn(p.shape, generator=gen)) if p.dim() == 1
                    else 0.05 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> Path:
    return tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl") / "src")


def test_published_72b_config_reports_the_14784_problem():
    config = json.loads((CONFIGS / "Qwen2-VL-72B-Instruct" / "config.json").read_text())
    for tp, per_gpu in ((2, 14784), (4, 7392)):
        problems = check_tp(config, None, tp, 128)
        assert problems and all(p.fixable_by_padding for p in problems)
        assert any(str(per_gpu) in p.message for p in problems)
        assert all("intermediate_size 29568 → 29696" in p.message for p in problems)
    arch = ModelShapes.from_config(config).arch
    assert arch.intermediate_key == "intermediate_size"
    padded = {**config, **arch.config_update(config, arch.intermediate_key,
                                             padded_intermediate(29568, 4, 128))}
    assert padded["intermediate_size"] == 29696
    assert check_tp(padded, None, 2, 128) == [] and check_tp(padded, None, 4, 128) == []
    problems, _ = check_checkpoint(CONFIGS / "Qwen2-VL-72B-Instruct", 2, 128)
    assert {p.module for p in problems} == {"mlp.down_proj"}  # gate/up: 14784 % 64 == 0


def test_plan_cli_reports_tp(capsys):
    from quantizer.cli import main
    assert main(["plan", str(CONFIGS / "Qwen2-VL-72B-Instruct"), "--vram-budget", "24G",
                 "--ram-budget", "256G", "--tp-size", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "plan for qwen2_vl" in out and "14784 (29568 / 2)" in out
    assert "7392 (29568 / 4)" in out and "29568 → 29696" in out


def test_seed_case_check_and_plan_cli(tmp_path, capsys):
    """The seed case as a user meets it, on the small Qwen2-VL's config alone: `quantize
    check` and `quantize plan --tp-size` name the 704 / 352 per-GPU widths and the padding
    that fixes them (the weights are not needed to know)."""
    from quantizer.cli import main

    src = tmp_path / "cfg"
    tiny_qwen2_vl_config().save_pretrained(src)
    for tp, per_gpu in ((2, 704), (4, 352)):
        assert main(["check", str(src), "--tp-size", str(tp), "--group-size", "128"]) == 2
        out = capsys.readouterr()
        assert f"{per_gpu} (1408 / {tp})" in out.out and "1408 → 1536" in out.out
        assert f"--pad-for-tp {tp}" in out.err and len(out.err.strip().splitlines()) == 1
    assert main(["plan", str(src), "--vram-budget", "8G", "--ram-budget", "8G",
                 "--tp-size", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "704 (1408 / 2)" in out and "352 (1408 / 4)" in out and "1408 → 1536" in out


@pytest.mark.slow
def test_seed_case_end_to_end(qwen2_vl, tmp_path, capsys):
    """Refused at TP 2 before any work, quantized with --pad-for-tp 2, and the export passes
    `quantize check` at TP 2 and 4 (vLLM's serving rules read off the written files)."""
    from quantizer.cli import main

    src = qwen2_vl
    source_names = set(load_file(src / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in source_names  # Qwen's on-disk names
    assert any(n.startswith("visual.") for n in source_names)
    cfg = json.loads((src / "config.json").read_text())
    problems = check_tp(cfg, None, 2, 128)
    assert problems and all(p.fixable_by_padding for p in problems)
    assert all("intermediate_size 1408 → 1536" in p.message for p in problems)
    assert {p.module for p in check_tp(cfg, None, 4, 128)} == {
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with pytest.raises(InputError, match="pad-for-tp 2"):
        quantize(str(src), str(tmp_path / "refused"), bits=4, group_size=128, method="gptq",
                 tp_size=2, calib_data=str(zoo.CALIB), calib_samples=4, calib_seqlen=32,
                 progress=False, device="cpu")
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "q"
    result = quantize(str(src), str(out), bits=4, group_size=128, method="gptq",
                      export_format="gptq", pad_for_tp=2, calib_data=str(zoo.CALIB),
                      calib_samples=4, calib_seqlen=32, progress=False, device="cpu")
    assert any("1408 -> 1536" in n for n in result.notes)
    exported = json.loads((out / "config.json").read_text())
    assert exported["text_config"]["intermediate_size"] == 1536
    assert "visual" in exported["quantization_config"]["modules_to_not_convert"]
    for tp in (2, 4):
        assert check_checkpoint(out, tp)[0] == []
        capsys.readouterr()
        assert main(["check", str(out), "--tp-size", str(tp)]) == 0
        assert f"TP-{tp}: ok" in capsys.readouterr().out
    # names: every non-quantized tensor as in the source; vision tensors bit for bit
    zoo.check_names(src, out)
    before, after = load_file(src / "model.safetensors"), {}
    for f in out.glob("*.safetensors"):
        after.update(load_file(f))
    visual = [n for n in before if n.startswith("visual.")]
    assert visual and all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], before[n])
                          for n in visual)
    assert after["model.layers.0.mlp.down_proj.qweight"].shape[0] * 8 == 1536  # padded inputs
    # transformers' own Qwen2-VL on the dequantized export computes what load() computes
    zoo.check_logits(out, "gptq", tmp_path)


@pytest.mark.slow
def test_compressed_tensors_ignores_the_vision_tower(qwen2_vl, tmp_path):
    out = tmp_path / "ct"
    quantize(str(qwen2_vl), str(out), bits=4, group_size=32, method="rtn",
             export_format="compressed-tensors", progress=False, device="cpu")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    ignore = q["ignore"]
    assert "lm_head" in ignore and r"re:.*visual\..*" in ignore
    import re
    pattern = next(p for p in ignore if "visual" in p)[3:]
    assert re.match(pattern, "visual.blocks.0.attn.qkv")  # vLLM's name (re.match)
    assert re.match(pattern, "model.visual.blocks.0.attn.qkv")
    assert not re.match(pattern, "model.layers.0.self_attn.q_proj")
    model = load(out)
    assert model is not None
