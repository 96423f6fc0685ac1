"""benchmarks/bench_giant.py at tiny widths on the CPU: the FP8 DeepSeek-V3 layout is
generated, quantized under a host-RAM budget, read back with the loader and compared with the
FP8 original, and the full model's ETA is extrapolated (the GPU run uses the same code)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_giant_tiny_end_to_end(tmp_path):
    out = tmp_path / "giant.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_giant.py"), "--tiny",
                           "--out", str(out), "--scratch", str(tmp_path / "s"),
                           "--runs", "gptq:80G:4G,awq:80G:4G", "--time-budget", "600"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    ckpt = Path(doc["checkpoint"]["path"])
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["first_k_dense_replace"] == 3 and cfg["num_hidden_layers"] == 5
    for case in doc["runs"]:
        assert case["status"] == "ok", case
        kinds = [x["kind"] for x in case["layers"]]
        assert kinds == ["dense"] * 3 + ["moe"] * 2
        assert all(x["rss"] <= 4 * 2**30 for x in case["layers"])
        assert case["export_check"]["status"] == "ok"
        assert case["export_check"]["quantized_linears"] > 10
        assert case["export_check"]["rel_error"] < 0.2
        eta = case["eta"]
        assert eta["total_s"] > 58 * eta["moe_s"] > 0
    assert "full DeepSeek-V3 ETA" in proc.stdout


@pytest.mark.slow
def test_a_killed_runs_finished_layers_are_read_back(tiny_checkpoint, tmp_path, monkeypatch):
    """What bench_giant reports for a run it had to stop: the layers committed so far."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_giant

    from quantizer.api import quantize
    from quantizer.errors import OutOfMemory

    monkeypatch.setenv("LAYERQUANT_INJECT_OOM", "1x9")  # layer 1 never fits
    with pytest.raises(OutOfMemory):
        quantize(tiny_checkpoint(), tmp_path / "q", bits=4, group_size=32, method="rtn",
                 calib_samples=2, calib_seqlen=16, progress=False)
    records = bench_giant.finished_layers(tmp_path / "q.job")
    assert [r["index"] for r in records] == [0] and records[0]["seconds"] > 0
