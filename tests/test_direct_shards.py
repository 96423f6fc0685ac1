"""The export's shard files written in place (quantizer/export/store.py) hold the same bytes as
the files safetensors' save_file and the layer-file writer produce, resume reads them back
byte-identically, and the job directory never holds a second copy of the model."""
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from quantizer.export.layout import (ExportLayout, TensorSpec, convention_holds,
                                     safetensors_header)
from quantizer.export.store import DirectStore
from quantizer.export.writer import ShardWriter

from helpers import assert_same_files, load_tensors, quantize_cli, quantize_cmd, signal_when

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.uint8,
          torch.int8, torch.bool, torch.float64, torch.int16)


def random_tensors(rng: random.Random, n: int, max_elems: int = 64) -> dict[str, torch.Tensor]:
    parts = ["model", "layers", str(rng.randrange(12)), "mlp", "self_attn", "q_proj", "qweight",
             "scales", "g_idx", "weight", "experts", str(rng.randrange(128)), "A", "b_1"]
    out = {}
    while len(out) < n:
        name = ".".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        if torch.Size(shape).numel() > max_elems:
            continue
        t = torch.randint(0, 2, shape) if dtype == torch.bool else torch.randn(shape) * 100
        out[name] = t.to(dtype)
    return out


def test_the_installed_safetensors_writes_the_planned_headers():
    assert convention_holds()


@pytest.mark.parametrize("seed", range(20))
def test_header_equals_save_file_bytes(seed):
    rng = random.Random(seed)
    tensors = random_tensors(rng, rng.randint(1, 30))
    header, offsets = safetensors_header([TensorSpec.of(k, v) for k, v in tensors.items()],
                                         {"format": "pt"})
    theirs = save(tensors, metadata={"format": "pt"})
    assert theirs[:len(header)] == header
    for name, (begin, end) in offsets.items():
        data = theirs[len(header) + begin:len(header) + end]
        assert data == tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(theirs) == len(header) + max((e for _, e in offsets.values()), default=0)


@pytest.mark.parametrize("seed", range(8))
def test_layout_and_store_write_what_the_shard_writer_writes(seed, tmp_path):
    """Random head + layers cut at a random shard size: the files written in place (layers in
    random order, as a resumed job writes them) equal ShardWriter's, index included."""
    rng = random.Random(seed)
    head = random_tensors(rng, rng.randint(1, 6), 4000)
    layers = [{f"model.layers.{i}.{k}": v for k, v in random_tensors(rng, rng.randint(1, 12),
                                                                      2000).items()}
              for i in range(rng.randint(1, 6))]
    max_bytes = rng.choice([64, 512, 4096, 1 << 30])
    ref = tmp_path / "ref"
    ref.mkdir()
    writer = ShardWriter(ref, max_bytes)
    writer.add(dict(sorted(head.items())))
    for layer in layers:
        writer.add(dict(sorted(layer.items())))
    writer.finish()

    spec = lambda d: [TensorSpec.of(k, v) for k, v in d.items()]  # noqa: E731
    layout = ExportLayout.plan(spec(head), [spec(l) for l in layers], max_bytes)
    assert ExportLayout.from_json(json.loads(json.dumps(layout.to_json()))).digest() == \
        layout.digest()
    store = DirectStore(tmp_path / "job", layout, "job-digest")
    store.create()
    order = list(range(len(layers)))
    rng.shuffle(order)
    for i in order:
        store.save_layer(i, layers[i], {"i": i})
    store._write(head)
    (store.final / "model.safetensors.index.json").unlink(missing_ok=True)
    text = layout.index_text()
    if text is not None:
        (store.final / "model.safetensors.index.json").write_text(text)
    assert_same_files(store.final, ref, skip_content=())
    for i in order:
        back = store.load_layer(i)
        assert set(back) == set(layers[i])
        assert all(torch.equal(back[k], layers[i][k]) for k in back)


def test_a_layer_that_differs_from_the_plan_is_refused(tmp_path):
    from quantizer.errors import QuantizerError
    layer = {"model.layers.0.w": torch.zeros(4, dtype=torch.float16)}
    layout = ExportLayout.plan([], [[TensorSpec.of(k, v) for k, v in layer.items()]], 1 << 20)
    store = DirectStore(tmp_path / "job", layout, "d")
    store.create()
    with pytest.raises(QuantizerError, match="differ from the planned layout"):
        store.save_layer(0, {"model.layers.0.w": torch.zeros(5, dtype=torch.float16)}, {})


# ---- end to end -------------------------------------------------------------------------
CASES = {
    "llama-awq": ("tiny-llama", ["--method", "awq", "--awq-grid", "3", "--max-shard-size",
                                 "300K"]),
    "llama-gptq-act": ("tiny-llama", ["--method", "gptq", "--act-order", "--max-shard-size",
                                      "200K"]),
    "ct-3bit-sym": ("tiny-llama", ["--method", "rtn", "--bits", "3", "--sym", "--format",
                                   "compressed-tensors", "--dtype", "bfloat16"]),
    "qwen3-moe-gptq": ("tiny-qwen3-moe", ["--method", "gptq", "--max-shard-size", "100K"]),
    "adaptive": ("tiny-llama", ["--method", "gptq", "--bits", "4.5"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_equals_the_layer_file_writers(case, tiny_checkpoint, tmp_path):
    """The same job written through layer files + assembly (the writer of earlier versions),
    in place synchronously, and in place from the writer thread (as on GPUs): same bytes."""
    preset, args = CASES[case]
    model = tiny_checkpoint(preset, num_hidden_layers=3)
    runs = {"layer-files": {"LAYERQUANT_DIRECT_SHARDS": "0"}, "direct": {}}
    if case in ("llama-gptq-act", "qwen3-moe-gptq"):
        runs["direct-async"] = {"LAYERQUANT_ASYNC_WRITE": "1"}
    for name, env in runs.items():
        extra = ["--save-hidden", "never"] if name == "direct-async" else []
        res = quantize_cli(model, tmp_path / name, *args, *extra, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    for name in runs:
        files = assert_same_files(tmp_path / name, tmp_path / "layer-files")
        assert len([k for k in files if k.endswith(".safetensors")]) >= 1


def _interrupted_job(model, out, args, stop_after: int, env=None):
    """A job stopped after layer `stop_after` is committed, as a kill would leave it."""
    job = out.parent / (out.name + ".job")
    cmd = quantize_cmd(model, out, *args)
    signal_when(cmd, job, lambda st: st["last_finished"]["quantize"] >= stop_after, env=env)
    if not job.exists() or out.exists():
        pytest.skip("the run finished before it could be interrupted")
    return job, cmd


@pytest.mark.slow
def test_resume_reads_finished_layers_from_the_shards(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=6)
    args = ["--method", "gptq", "--max-shard-size", "150K"]
    ref = quantize_cli(model, tmp_path / "ref", *args, "--save-hidden", "never")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "out"
    job, cmd = _interrupted_job(model, out, [*args, "--save-hidden", "never"], 2)
    # one copy of the model at most: finished layers live in the shards only
    assert not list((job / "layers").glob("*.safetensors"))
    shards = sum(p.stat().st_blocks * 512 for p in (job / "final").iterdir())
    assert shards <= 1.1 * sum(p.stat().st_size for p in (tmp_path / "ref").iterdir())
    bad = subprocess.run([*cmd, "--resume", "--max-shard-size", "100K"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--max-shard-size" in bad.stderr, bad.stderr[-800:]
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_files(out, tmp_path / "ref")
    assert not job.exists()


@pytest.mark.slow
def test_a_job_started_with_layer_files_finishes_with_them(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=6)
    args = ["--method", "rtn", "--max-shard-size", "150K"]
    ref = quantize_cli(model, tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "out"
    job, cmd = _interrupted_job(model, out, args, 1, env={"LAYERQUANT_DIRECT_SHARDS": "0"})
    assert list((job / "layers").glob("quantize-*.safetensors"))
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)  # default env
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_files(out, tmp_path / "ref")


@pytest.mark.slow
def test_a_damaged_shard_refuses_the_resume(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=6)
    out = tmp_path / "out"
    job, cmd = _interrupted_job(model, out, ["--method", "rtn"], 1)
    shard = next((job / "final").glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert res.returncode == 2 and "damaged" in res.stderr and "--overwrite" in res.stderr
    assert job.exists()  # the refusal keeps the job for the user to decide


@pytest.mark.slow
def test_kills_while_the_writer_thread_writes_then_resume(tiny_checkpoint, tmp_path):
    """GPU runs write and commit layer i on a thread while layer i+1 is quantized
    (LAYERQUANT_ASYNC_WRITE=1 does the same on the CPU): killed anywhere, resumed, the same
    bytes."""
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=8)
    args = ["--method", "gptq", "--max-shard-size", "200K", "--save-hidden", "never"]
    env = {"LAYERQUANT_ASYNC_WRITE": "1"}
    ref = quantize_cli(model, tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, job = tmp_path / "out", tmp_path / "out.job"
    cmd = quantize_cmd(model, out, *args)
    rng = random.Random(7)
    for attempt in range(5):
        target = rng.randint(0, 6)
        signal_when(cmd + (["--resume"] if attempt else []), job,
                    lambda st: st["last_finished"]["quantize"] >= target, rng.uniform(0, 0.5),
                    env=env)
        if out.exists():
            break
    if not out.exists():
        done = subprocess.run(cmd + ["--resume"], env={**os.environ, **env}, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_files(out, tmp_path / "ref")


# ---- vision-language models -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from test_vlm import tiny_qwen2_vl
    return tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "src")  # bfloat16


def test_the_plan_keeps_a_vision_towers_dtype(tiny_vlm):
    """The text model's non-layer tensors are planned in the output dtype, the vision tower's
    and projector's in the checkpoint's (as pipeline's layer-file assembly writes them)."""
    from quantizer.export.store import head_specs
    from quantizer.stream.source import CheckpointSource

    source = CheckpointSource(tiny_vlm)
    specs = {s.name: s for s in head_specs(source, source.arch, torch.float16)}
    visual = [n for n in specs if n.startswith("visual.")]
    assert visual and all(specs[n].dtype == "BF16" for n in visual)
    text = [n for n in specs if not n.startswith("visual.")]
    assert "model.embed_tokens.weight" in text and all(specs[n].dtype == "F16" for n in text)


@pytest.mark.slow
def test_a_vlm_export_equals_the_layer_file_writer(tiny_vlm, tmp_path):
    """Qwen2-VL (bfloat16 source, float16 export, several shards): direct shards hold the
    layer-file writer's bytes, the vision tower bit for bit as stored."""
    args = ["--method", "rtn", "--format", "gptq", "--max-shard-size", "2M"]
    for name, env in {"layer-files": {"LAYERQUANT_DIRECT_SHARDS": "0"}, "direct": {}}.items():
        res = quantize_cli(tiny_vlm, tmp_path / name, *args, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    files = assert_same_files(tmp_path / "direct", tmp_path / "layer-files")
    assert len([k for k in files if k.endswith(".safetensors")]) >= 2
    before = load_tensors(tiny_vlm)
    after = load_tensors(tmp_path / "direct")
    visual = [n for n in before if n.startswith("visual.")]
    assert visual and all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], before[n])
                          for n in visual)
    assert after["model.embed_tokens.weight"].dtype == torch.float16
