"""Calibration coverage per expert: token counts for a constructed routing, and the stated
fallback (RTN, with a warning, listed in the report) for experts that saw too few tokens."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer import quantize
from quantizer.export import get_exporter
from quantizer.methods.rtn import rtn_quantize
from quantizer.arch.experts import ExpertMLP, UnfusedExperts

CHANNEL = 7
# Router logits = x[CHANNEL] * slope: tokens with x > 0 go to experts {0, 1}, x < 0 to {4, 3};
# expert 2 (slope 0) is never in a top 2.
SLOPES = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])


@pytest.fixture
def routed_checkpoint(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("tiny-mixtral", dtype=torch.float32, num_local_experts=5)
    dst = tmp_path / "routed"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for i in range(2):
        norm = torch.zeros(128)
        norm[CHANNEL] = 1.0  # the router (and experts) see only this channel
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = norm
        router = torch.zeros(5, 128)
        router[:, CHANNEL] = SLOPES
        tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"] = router
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def transformers_layer0_counts(path, settings):
    """Tokens per expert of layer 0 as transformers' own (fused) Mixtral routes them."""
    from transformers import AutoModelForCausalLM

    from quantizer.run.calibrate import calibration_tokens
    from quantizer.run.job import plan_job

    ids = calibration_tokens(plan_job(path, settings))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    counts = torch.zeros(5, dtype=torch.int64)

    def hook(mod, args, out):
        counts.add_(torch.bincount(out[2].flatten(), minlength=5))

    model.model.layers[0].mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        for i in range(0, len(ids), 2):
            model(ids[i:i + 2])
    return counts.tolist()


@pytest.mark.slow
def test_token_counts_and_rtn_fallback_for_a_constructed_routing(routed_checkpoint, tmp_path,
                                                                  prose_file):
    from quantizer.settings import CalibSettings, QuantSettings

    out = tmp_path / "q"
    with pytest.warns(UserWarning, match="rounded to nearest"):
        result = quantize(routed_checkpoint, out, bits=4, group_size=32, method="gptq",
                          export_format="gptq", calib_data=str(prose_file), calib_samples=4,
                          calib_seqlen=32, progress=False, min_expert_tokens=16)
    coverage = result.expert_coverage()
    assert set(coverage) == {0, 1}
    for layer, c in coverage.items():
        t = c["tokens"]
        assert t[2] == 0  # never routed to
        assert t[0] == t[1] and t[3] == t[4]  # top-2 pairs by the sign of x[CHANNEL]
        assert t[0] + t[3] == 4 * 32  # every token went to exactly one pair
        assert c["fallback_rtn"] == [e for e in range(5) if t[e] < 16]
        assert 2 in c["fallback_rtn"] and c["min_tokens"] == 16
    settings = QuantSettings(method="gptq", group_size=32,
                             calib=CalibSettings(str(prose_file), 4, 32, 0))
    assert coverage[0]["tokens"] == transformers_layer0_counts(routed_checkpoint, settings)
    assert "RTN fallback (< 16 tokens): 2 (0)" in str(result)
    assert result.to_dict()["expert_coverage"]["1"]["tokens"] == coverage[1]["tokens"]

    # The fallback expert's export is exactly RTN of its checkpoint weight; a calibrated
    # expert's (GPTQ) is not.
    exported = load_file(out / "model.safetensors")
    original = load_file(routed_checkpoint / "model.safetensors")
    gptq = get_exporter("gptq")
    calibrated = next(e for e in range(5) if e not in coverage[1]["fallback_rtn"])
    for e, same in ((2, True), (calibrated, False)):
        for lin in ("w1", "w2", "w3"):
            name = f"model.layers.1.block_sparse_moe.experts.{e}.{lin}"
            codes = gptq.linear_from_tensors(name, exported).codes
            # GPTQ exports are symmetric by default (gptq_marlin; issue 26)
            rtn = rtn_quantize(original[f"{name}.weight"], 4, 32, symmetric=True).codes
            assert torch.equal(codes.to(torch.uint8), rtn) == same, (e, lin)


def test_unfused_experts_count_routed_tokens_and_skip_masked_slots():
    gen = torch.Generator().manual_seed(0)
    experts = UnfusedExperts([ExpertMLP(("w1", "w3", "w2"), 16, 8, torch.nn.SiLU())
                              for _ in range(4)])
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    x = torch.randn(10, 16, generator=gen)
    index = torch.randint(0, 4, (10, 2), generator=gen)
    index[:, 1] = (index[:, 0] + 1) % 4
    index[3, 1] = -1  # an expert-parallel style masked slot: ignored, not counted
    weights = torch.rand(10, 2, generator=gen)
    experts.start_counting()
    y = experts(x, index, weights)
    valid = index[index >= 0]
    assert experts.stop_counting().tolist() == torch.bincount(valid, minlength=4).tolist()
    assert all(e.tokens_seen is None for e in experts)  # counting is off again
    want = torch.zeros_like(x)
    for t in range(10):
        for k in range(2):
            e = int(index[t, k])
            if e >= 0:
                want[t] += weights[t, k] * experts[e](x[t:t + 1])[0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)  # summation order differs


@pytest.mark.slow
def test_interrupted_moe_run_resumes_byte_identical(tiny_checkpoint, tmp_path, prose_file,
                                                    monkeypatch, caplog):
    """Stop after layer 0 of a GPTQ run on Qwen3-MoE; the resumed run replays layer 0 from its
    file (per-expert tensors, hidden states not saved) and writes the same bytes."""
    from quantizer.run.layer_loop import LayerLoop

    src = tiny_checkpoint("tiny-qwen3-moe", dtype=torch.float32)
    kw = dict(bits=4, group_size=32, method="gptq", export_format="gptq",
              calib_data=str(prose_file), calib_samples=4, calib_seqlen=32, progress=False,
              min_expert_tokens=1, save_hidden="never")
    quantize(src, tmp_path / "straight", **kw)
    original = LayerLoop._layer

    def stop_at_layer_1(self, i):
        if i == 1:
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(LayerLoop, "_layer", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, tmp_path / "resumed", **kw)
    monkeypatch.setattr(LayerLoop, "_layer", original)
    caplog.set_level("INFO", logger="quantizer")
    quantize(src, tmp_path / "resumed", resume=True, **kw)
    said = caplog.messages
    assert any("replaying 1 finished layers" in m for m in said), said
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
