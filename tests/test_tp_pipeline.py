"""Tensor-parallel alignment through the command line and the pipeline: `quantize check` flags
exactly the misaligned configs; `--tp-size N` refuses before any work; `--pad-for-tp N` pads
the MLP exactly, records old -> new, and its export passes the check."""
from __future__ import annotations

import json
import re

import pytest
import torch

from quantizer import load, quantize
from quantizer.cli import main
from quantizer.settings import QuantSettings
from quantizer.errors import InputError
from quantizer.run.job import plan_job
from quantizer.stream.skeleton import (build_skeleton, capture_layer0_inputs, layer_output,
                                       load_layer)

from test_e2e import fake_quant_reference
from test_tp import dense  # 70B-class attention: only the MLP can be flagged

GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
MLP = {GATE, UP, DOWN}
EXPERTS = {"experts.gate", "experts.up", "experts.down"}

# Worked out by hand at g128 (column gate/up need out/tp % 64, row down needs in/tp % 128):
#   14784: /2 = 7392 (%64 = 32)  /4 = 3696 (%64 = 48)  /8 = 1848 (%64 = 56)
#   29568: /2 = 14784 (%64 = 0, %128 = 64)  /4 = 7392  /8 = 3696
#   10944: /2 = 5472 (%64 = 32)  /4 = 2736 (%64 = 48)  /8 = 1368 (%64 = 24)
#   11008 (Llama-2-7B): /2 = 5504 = 43·128  /4 = 2752 (%64 = 0, %128 = 64)  /8 = 1376 (%64 = 32)
#   14336 (Llama-3-8B): /8 = 1792 = 14·128, aligned at every TP ≤ 8
EXPECTED = {
    (14784, 2): MLP, (14784, 4): MLP, (14784, 8): MLP,
    (29568, 2): {DOWN}, (29568, 4): MLP, (29568, 8): MLP,
    (10944, 2): MLP, (10944, 4): MLP, (10944, 8): MLP,
    (11008, 2): set(), (11008, 4): {DOWN}, (11008, 8): MLP,
    (14336, 2): set(), (14336, 4): set(), (14336, 8): set(),
}
# Qwen3-30B-A3B's 128 experts of width 768; fused-MoE Marlin: (768/tp) % max(64, g).
#   g128: /2 = 384 ok, /4 = 192 (%128 = 64), /8 = 96      g64: 192 ok, 96 (%64 = 32)
EXPECTED_MOE = {(2, 128): set(), (4, 128): EXPERTS, (8, 128): EXPERTS,
                (2, 64): set(), (4, 64): set(), (8, 64): EXPERTS}


def write_config(path, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def run_check(capsys, path, tp, *extra) -> tuple[int, set[str], str]:
    """Exit code, the modules named in the problem lines, the whole output."""
    code = main(["check", str(path), "--tp-size", str(tp), *extra])
    out = capsys.readouterr().out
    flagged = set(re.findall(r"^  (\S+) at TP \d+:", out, flags=re.M))
    return code, flagged, out


@pytest.mark.parametrize("intermediate,tp", sorted(EXPECTED))
def test_check_flags_exactly_the_misaligned(intermediate, tp, tmp_path, capsys):
    path = write_config(tmp_path / "m", **dense(intermediate))
    code, flagged, out = run_check(capsys, path, tp)
    assert flagged == EXPECTED[intermediate, tp], out
    if flagged:
        assert code == 2 and f"--pad-for-tp {tp}" in out
    else:
        assert code == 0 and out.strip().startswith(f"TP-{tp}: ok")


@pytest.mark.parametrize("tp,group", sorted(EXPECTED_MOE))
def test_check_moe_reads_group_size_from_quantization_config(tp, group, tmp_path, capsys):
    cfg = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
               num_attention_heads=32, num_key_value_heads=4, head_dim=128,
               num_hidden_layers=48, vocab_size=151936, decoder_sparse_step=1,
               mlp_only_layers=[],
               quantization_config={"quant_method": "gptq", "bits": 4, "group_size": group})
    path = write_config(tmp_path / "moe", **cfg)
    # --group-size is the fallback only: the checkpoint's own group size wins.
    code, flagged, out = run_check(capsys, path, tp, "--group-size", "32")
    assert flagged == EXPECTED_MOE[tp, group], out
    assert code == (2 if flagged else 0)


def test_check_compressed_tensors_groups_and_fallback(tmp_path, capsys):
    # 11008 at TP 4: the row-parallel share 2752 is a multiple of 64 but not of 128, so it
    # fails at every group size (min_thread_k) — and a config with no quantization_config
    # uses --group-size.
    ct = {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 64}},
        "group_1": {"weights": {"num_bits": 8, "strategy": "channel", "group_size": None}}}}
    path = write_config(tmp_path / "ct", **dense(11008, quantization_config=ct))
    code, flagged, out = run_check(capsys, path, 4)
    assert code == 2 and flagged == {DOWN} and "group size -1, 64" in out
    code, _, out = run_check(capsys, path, 2)
    assert code == 0 and "TP-2: ok" in out
    # (32 heads of 258: 64 heads would be 129 wide, a rotary table transformers cannot build)
    plain = write_config(tmp_path / "plain", **dense(14336, hidden_size=8192 + 64,
                                                     num_attention_heads=32))
    # hidden 8256 is not a multiple of 128: q/k/v/gate/up inputs fail at every TP, unfixable
    code, flagged, out = run_check(capsys, plain, 2, "--group-size", "64")
    assert code == 2 and {GATE, UP, "self_attn.q_proj"} <= flagged
    assert "padding cannot fix" in out
    assert main(["check", str(tmp_path / "missing"), "--tp-size", "2"]) == 2


# A tiny Llama whose attention splits over TP 2 (hidden 256 = 2·128 per GPU for o_proj; 2 KV
# heads of 64 -> 64 outputs per GPU) but whose MLP (224 -> 112 per GPU) does not.
TINY = dict(intermediate_size=224, hidden_size=256)
ARGS = ["--method", "rtn", "--group-size", "32", "--calib-samples", "0", "--no-progress"]


def test_misaligned_tp_target_fails_before_any_work(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("tiny-llama", **TINY)
    out = tmp_path / "q"
    assert main([str(src), "-o", str(out), *ARGS, "--tp-size", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line; `quantize check` lists all
    for module in (GATE, UP, DOWN):
        assert module in err, err
    assert "--pad-for-tp 2" in err and "224 → 256" in err
    assert not out.exists() and not (tmp_path / "q.job").exists()
    assert list(tmp_path.iterdir()) == []
    # Padding for a different TP leaves TP 2 checked; attention at TP 4 cannot be padded.
    with pytest.raises(InputError, match=r"TP 4.*padding cannot fix.*self_attn\.o_proj"):
        quantize(src, out, method="rtn", group_size=32, calib_samples=0, progress=False,
                 pad_for_tp=4)
    assert list(tmp_path.iterdir()) == []


def test_group_size_auto_reads_the_padded_width(tiny_checkpoint):
    src = tiny_checkpoint("tiny-llama", **TINY)
    plain = plan_job(src, QuantSettings(method="rtn"))
    assert plain.padded_intermediate is None and plain.group_size == 32  # 224 = 7·32
    job = plan_job(src, QuantSettings(method="rtn", pad_for_tp=2))
    assert job.padded_intermediate == 256 and job.group_size == 128
    assert any("224 -> 256 for TP 2 (g128)" in n for n in job.notes), job.notes
    assert any(n.startswith("TP-2: ok") for n in job.notes)
    # Already aligned: no padding, said so.
    aligned = plan_job(tiny_checkpoint("tiny-llama", hidden_size=256),
                       QuantSettings(method="rtn", pad_for_tp=2))
    assert aligned.padded_intermediate is None
    assert any("already splits over TP 2" in n for n in aligned.notes)


def test_tp_size_is_a_check_pad_for_tp_changes_the_result():
    base = QuantSettings().result_dict()
    assert QuantSettings(tp_size=4).result_dict() == base
    assert QuantSettings(pad_for_tp=4).result_dict() != base
    for bad in (0, -2, "2", 1.5):
        with pytest.raises(InputError, match="positive integer"):
            QuantSettings(tp_size=bad).validated()


def padded_skeleton_logits(src, padded, ids):
    from quantizer.stream.source import CheckpointSource
    source = CheckpointSource(src)
    model = build_skeleton(source, "cpu", torch.float32, padded)
    _, kw = capture_layer0_inputs(model, ids[:1])
    h = model.get_input_embeddings()(ids)
    for i in range(source.num_layers):
        layer = load_layer(model, source, i, "cpu", torch.float32, padded)
        assert layer.mlp.down_proj.weight.shape[1] == padded
        assert layer.mlp.gate_proj.weight.shape[0] == padded
        h = layer_output(layer(h, **kw))
    return model.lm_head(model.model.norm(h))


@pytest.mark.slow
def test_pad_for_tp_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("tiny-llama", **TINY)
    out = tmp_path / "q"
    assert main([str(src), "-o", str(out), *ARGS, "--tp-size", "2", "--pad-for-tp", "2"]) == 0
    captured = capsys.readouterr()
    assert "224 -> 256 for TP 2 (g32)" in captured.out + captured.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 256 and cfg["quantization_config"]["group_size"] == 32
    record = json.loads((out / "layerquant.json").read_text())
    assert record["original_intermediate_size"] == 224
    assert any("224 -> 256" in n for n in record["notes"])
    assert not (tmp_path / "q.job").exists()

    code, flagged, text = run_check(capsys, out, 2)
    assert code == 0 and not flagged and "TP-2: ok (group size 32)" in text
    code, _, _ = run_check(capsys, src, 2, "--group-size", "32")
    assert code == 2  # the original still would not load

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Padding alone is exact: the padded float model's logits are the original's.
        original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        want_fp = original(ids).logits
        got_fp = padded_skeleton_logits(src, 256, ids)
        assert float((got_fp - want_fp).abs().max()) < 1e-4 * float(want_fp.abs().max())
        # The quantized export reloads to the fake-quantized original (the zero group added
        # to down_proj and the zero rows of gate/up quantize to exact zeros).
        got = load(out)(ids).logits
        want = fake_quant_reference(src, 4, 32)(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < 5e-3, rel
