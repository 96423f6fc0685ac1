"""The quality benchmark (benchmarks/bench_quality.py): one real --quick run on stories260K, and
its bits-per-weight accounting on made-up exports."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_quality  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not bench_quality.STORIES.is_dir(), reason="../shared (stories260K) absent")
def test_quick_run_on_stories(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_quality.py"), "--quick",
                           "--models", "stories", "--methods", "fp16,rtn", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    env = doc["environment"]
    assert {"command", "date", "torch", "transformers", "machine"} <= set(env)
    assert env["torch"] == torch.__version__ and "--quick" in env["command"]
    model = doc["models"]["stories"]
    p = model["protocol"]
    assert (p["calib_samples"], p["seqlen"], p["windows"]) == (
        bench_quality.QUICK["calib_samples"], bench_quality.QUICK["seqlen"],
        bench_quality.QUICK["windows"])
    fp, rtn = model["rows"]
    assert (fp["row"], rtn["row"]) == ("fp16", "rtn")
    assert fp["status"] == rtn["status"] == "ok", rtn.get("reason")
    # the fp row is the base perplexity measured on the same windows as the quantized row
    assert fp["ppl"] == rtn["base_ppl"] and math.isfinite(rtn["ppl"])
    assert rtn["tokens"] == p["windows"] * (p["seqlen"] - 1)
    assert rtn["ppl"] > 1 and fp["ppl"] > 1 and rtn["kl"] > 0
    # 4-bit g32: 4 + (16 + 4) / 32 = 4.625 bits per stored weight, and the MLP padded from 172
    # to 192 stores 53248 weights per layer for 49408 original ones (x1.078)
    assert 4.625 * 53248 / 49408 <= rtn["bpw"] < 5.1 and rtn["bpw_with_index"] >= rtn["bpw"]
    assert rtn["quantized_linears"] == 5 * 7  # 5 layers x q,k,v,o,gate,up,down
    # stories260K is also judged on in-domain text (TinyStories), on the same protocol
    if bench_quality.TINYSTORIES.is_file():
        ind = rtn["in_domain"]
        assert fp["in_domain"]["ppl"] == ind["base_ppl"] and ind["kl"] > 0
        assert 1 < ind["base_ppl"] < rtn["base_ppl"]  # in-domain text is far easier for it
    md = out.with_suffix(".md").read_text()
    assert "| rtn |" in md and f"{rtn['ppl']:.3f}" in md and "first 4 windows" in md
    assert md.strip() in proc.stdout  # the table is printed at the end


def _linear(rng, out_f, in_f, bits, group):
    """A GPTQ-layout export of one linear with random values; returns tensors and exact bits."""
    groups = 1 if group == -1 else in_f // group
    t = {"qweight": torch.randint(0, 2**31 - 1, (in_f * bits // 32, out_f), dtype=torch.int32),
         "qzeros": torch.randint(0, 2**31 - 1, (groups, out_f * bits // 32), dtype=torch.int32),
         "scales": torch.rand(groups, out_f, dtype=torch.float16),
         "g_idx": torch.arange(in_f, dtype=torch.int32) // (in_f if group == -1 else group)}
    data = in_f * out_f * bits + groups * out_f * bits + groups * out_f * 16
    return t, data, in_f * 32


def test_bits_per_weight_counts_every_quantized_tensor(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    base, export, data_bits, index_bits, weights = {}, {}, 0, 0, 0
    for i in range(rng.randint(2, 5)):
        out_f, in_f = 32 * rng.randint(1, 6), 64 * rng.randint(1, 4)
        bits, group = rng.choice([4, 8]), rng.choice([-1, 32, 64])
        name = f"model.layers.{i}.mlp.proj"
        base[name + ".weight"] = torch.randn(out_f, in_f, dtype=torch.float16)
        t, d, idx = _linear(rng, out_f, in_f, bits, group)
        export.update({f"{name}.{k}": v for k, v in t.items()})
        data_bits, index_bits, weights = data_bits + d, index_bits + idx, weights + out_f * in_f
    # unquantized tensors in the export must not count
    base["model.norm.weight"] = export["model.norm.weight"] = torch.randn(64)
    (tmp_path / "b").mkdir()
    (tmp_path / "q").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    save_file(export, str(tmp_path / "q" / "model.safetensors"))
    got = bench_quality.bits_per_weight(tmp_path / "q", tmp_path / "b")
    assert got["quantized_weights"] == weights
    assert got["bpw"] == pytest.approx(data_bits / weights, rel=1e-12)
    assert got["bpw_with_index"] == pytest.approx((data_bits + index_bits) / weights, rel=1e-12)


def test_checks_compare_the_rows_the_issues_name():
    ppl = [random.uniform(5, 50) for _ in range(4)]
    kl = [random.uniform(0.01, 1) for _ in range(4)]
    rows = [{"row": name, "status": "ok", "ppl": p, "kl": k, "bpw_with_index": 4.5}
            for name, p, k in zip(("rtn", "awq", "gptq", "adaptive-at-gptq"), ppl, kl)]
    rows.append({"row": "adaptive-3.0", "status": "not available"})
    c = bench_quality.checks(rows)
    assert c["awq_beats_rtn"]["ppl"] == (ppl[1] < ppl[0])
    assert c["awq_beats_rtn"]["kl"] == (kl[1] < kl[0])
    assert c["awq_beats_rtn"]["ppl_pair"] == [ppl[1], ppl[0]]
    no_worse = c["adaptive_at_gptq_no_worse_than_gptq"]
    assert no_worse["ppl"] == (ppl[3] <= ppl[2]) and no_worse["kl"] == (kl[3] <= kl[2])
    # a row that did not run leaves its comparison out rather than guessing
    assert bench_quality.checks([r for r in rows if r["row"] != "awq"]).keys() == {
        "adaptive_at_gptq_no_worse_than_gptq"}


def test_merge_takes_rows_of_a_second_run_in_row_order():
    def row(name):
        return {"row": name, "status": "ok", "ppl": random.uniform(5, 50), "kl": random.random(),
                "base_ppl": 4.0}
    proto = {"group_size": 64, "seqlen": 512}
    doc = {"environment": {"command": "a"},
           "models": {"m": {"protocol": dict(proto), "rows": [row("rtn"), row("awq")]},
                      "s": {"protocol": {"group_size": -1}, "rows": [row("rtn")]}}}
    gptq, fp = row("gptq"), row("fp16")
    other = {"environment": {"command": "b"},
             "models": {"m": {"protocol": dict(proto), "rows": [fp, gptq]},
                        "s": {"protocol": {"group_size": 32}, "rows": [row("awq")]}}}
    bench_quality.merge(doc, other)
    m = doc["models"]["m"]
    assert [r["row"] for r in m["rows"]] == ["fp16", "rtn", "awq", "gptq"]
    assert m["rows"][3]["ppl"] == gptq["ppl"] and m["rows"][3]["measured_by"] == "b"
    assert "measured_by" not in m["rows"][1] and m["base_ppl_spread"] == 0
    # another protocol: the model is replaced whole, never mixed
    assert doc["models"]["s"] is other["models"]["s"]
