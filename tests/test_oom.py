"""OOM recovery in the layer loop, on CPU: an injected torch.cuda.OutOfMemoryError (the
LAYERQUANT_INJECT_OOM hook) is retried with a halved chunk and gives byte-identical output;
the chunk size and where hidden states wait never change the output; when nothing is left to
shrink the run stops with OutOfMemory, keeps finished layers, and --resume finishes it."""
from __future__ import annotations

import json
import random

import pytest
import torch

from quantizer.settings import CalibSettings, QuantSettings
from quantizer.errors import OutOfMemory
from quantizer.stream.hidden_store import HiddenStore
from quantizer.run.oom import INJECT_ENV, injection_plan, is_oom, maybe_inject
from quantizer.run.quantize import run_quantize
from quantizer.settings import OutputSettings

from helpers import assert_same_files

LAYERS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from quantizer.demo.synthetic import write_checkpoint
    out = tmp_path_factory.mktemp("oom-model")
    # random weights, seeded from this fixture's name (tests/seeding.py)
    return write_checkpoint(out, preset="tiny-llama", num_hidden_layers=LAYERS,
                            outlier_channels=4, seed=random.randrange(1 << 16))


def settings(method, prose, chunk=8, hidden="auto", samples=8):
    # one calibration shard: chunks then span all samples, so a changed chunk size really
    # regroups the samples (with 8 shards of 1 sample every chunk would be 1 sample anyway)
    return QuantSettings(bits=4, group_size=32, method=method,
                         calib=CalibSettings(str(prose), samples, 64, 0, shards=1),
                         chunk_size=chunk,
                         hidden_device=hidden, save_hidden="never")


def run(model_dir, out, s, **kw):
    return run_quantize(model_dir, s, OutputSettings(out, overwrite=True, **kw), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_injected_oom_is_retried_with_identical_output(method, model, prose_file, tmp_path,
                                                      monkeypatch):
    model_dir = model
    clean = run(model_dir, tmp_path / "clean", settings(method, prose_file))
    monkeypatch.setenv(INJECT_ENV, "1")
    hit = run(model_dir, tmp_path / "hit", settings(method, prose_file))
    assert_same_files(tmp_path / "hit", tmp_path / "clean")
    assert [len(r.oom_retries) for r in hit.layers] == [0, 1, 0]
    assert "injected" in hit.layers[1].oom_retries[0] and "chunk" in hit.layers[1].oom_retries[0]
    # the smaller chunk stays for later layers; the clean run kept its chunk throughout
    assert [r.decisions["chunk"] for r in hit.layers] == [8, 4, 4]
    assert [r.decisions["chunk"] for r in clean.layers] == [8, 8, 8]
    report = json.loads(hit.to_json())
    assert report["layers"][1]["oom_retries"] and "retries" in str(hit)
    assert [r.output_error for r in hit.layers] == pytest.approx(
        [r.output_error for r in clean.layers], rel=1e-6)


@pytest.mark.slow
def test_chunk_size_and_disk_hidden_states_do_not_change_output(model, prose_file, tmp_path,
                                                                monkeypatch):
    model_dir = model
    run(model_dir, tmp_path / "a", settings("gptq", prose_file, chunk=8))
    written = []
    append = HiddenStore.append

    def spy(self, chunks, x):
        append(self, chunks, x)
        if chunks.where == "disk":
            written.append(chunks.files[-1])

    monkeypatch.setattr(HiddenStore, "append", spy)
    res = run(model_dir, tmp_path / "b", settings("gptq", prose_file, chunk=3, hidden="disk"))
    assert_same_files(tmp_path / "b", tmp_path / "a")
    assert {r.decisions["hidden"] for r in res.layers} == {"disk"}
    # embeddings + (reference + outputs) per layer, chunks of 3, 3 and 2 samples
    assert len(written) == 3 * (1 + 2 * LAYERS)
    assert not any(p.exists() for p in written)  # every file deleted when replaced


@pytest.mark.slow
def test_gives_up_when_nothing_is_left_then_resume_finishes(model, prose_file, tmp_path,
                                                           monkeypatch):
    model_dir = model
    run(model_dir, tmp_path / "clean", settings("gptq", prose_file, chunk=2))
    # layer 1 fails on every attempt: chunk 2 -> 1, hidden cpu -> disk, then no move is left
    monkeypatch.setenv(INJECT_ENV, "1x9")
    with pytest.raises(OutOfMemory, match="layer 1.*--resume"):
        run(model_dir, tmp_path / "out", settings("gptq", prose_file, chunk=2))
    job = tmp_path / "out.job"
    state = json.loads((job / "state.json").read_text())
    assert not (tmp_path / "out").exists()
    assert state["last_finished"]["quantize"] == 0  # layer 0 stays committed
    monkeypatch.delenv(INJECT_ENV)
    res = run_quantize(model_dir, settings("gptq", prose_file, chunk=2),
                       OutputSettings(tmp_path / "out", resume=True), progress=False)
    assert_same_files(tmp_path / "out", tmp_path / "clean")
    assert [r.oom_retries for r in res.layers] == [[], [], []]


def test_hook_and_classification():
    assert injection_plan("") == {} and injection_plan("3") == {3: 1}
    assert injection_plan("1, 3x2") == {1: 1, 3: 2}
    plan = injection_plan("2x2")
    for attempt in (0, 1):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            maybe_inject(plan, 2, attempt)
    maybe_inject(plan, 2, 2)
    maybe_inject(plan, 1, 0)
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(MemoryError()) and is_oom(RuntimeError("DefaultCPUAllocator: can't allocate "
                                                         "memory: you tried to allocate 8 GB"))
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("out of memory"))


def test_hidden_store_round_trip_rechunk_and_release(tmp_path):
    store = HiddenStore(torch.device("cpu"), tmp_path / "h")
    xs = [torch.randn(3, 5, 7).to(torch.bfloat16), torch.randn(2, 5, 7).to(torch.bfloat16)]
    disk = store.new("disk")
    for x in xs:
        store.append(disk, x)
    assert len(disk.files) == 2 and all(p.exists() for p in disk.files)
    assert all(torch.equal(a, b) for a, b in zip(disk, xs))
    small = store.rechunk(disk, 1)
    assert [t.shape[0] for t in small] == [1] * 5 and small.files and not disk.files
    assert torch.equal(torch.cat(list(small)), torch.cat(xs))
    ram = store.move(small, "cpu")
    assert ram.where == "cpu" and not any(p.exists() for p in (tmp_path / "h").iterdir())
    assert torch.equal(torch.cat(list(ram)), torch.cat(xs))
    assert store.move(ram, "cpu") is ram


@pytest.mark.slow
def test_a_memory_plan_drives_the_loop_and_its_shrink(model, prose_file, tmp_path,
                                                      monkeypatch):
    """GPU runs take their decisions from the plan and recover through plan.shrink; on CPU the
    same path runs with a plan made for the host (the planner plans a host 'device' too)."""
    import quantizer.run.quantize as run_module
    from quantizer.plan.planner import make_plan
    from quantizer.plan.shapes import ModelShapes
    from quantizer.plan.sizes import GIB

    model_dir = model
    real = run_module.plan_job

    def with_host_plan(path, s, *args, **kwargs):
        job = real(path, s, *args, **kwargs)
        job.plan = make_plan(ModelShapes.from_config(job.source.raw_config), "gptq",
                             s.calib.samples, s.calib.seqlen, [], {}, 64 * GIB, 4)
        return job

    monkeypatch.setattr(run_module, "plan_job", with_host_plan)
    clean = run(model_dir, tmp_path / "clean", settings("gptq", prose_file, chunk=1))
    assert {r.decisions["chunk"] for r in clean.layers} == {8}  # the plan's, not the setting's
    assert all(r.predicted_peak and r.predicted_peak > 0 for r in clean.layers)
    monkeypatch.setenv(INJECT_ENV, "2x2")
    hit = run(model_dir, tmp_path / "hit", settings("gptq", prose_file, chunk=1))
    assert_same_files(tmp_path / "hit", tmp_path / "clean")
    steps = hit.layers[2].oom_retries
    assert len(steps) == 2 and all("oom: chunk" in x for x in steps)
    assert hit.layers[2].decisions["chunk"] == 2
    assert hit.layers[2].predicted_peak < clean.layers[2].predicted_peak


def test_an_explicit_budget_caps_the_allocator(monkeypatch):
    """--vram-budget binds: the allocator's limit is the budget less the CUDA context (GPU
    calls replaced by fakes here; the GPU benchmark runs the real ones)."""
    from types import SimpleNamespace

    from quantizer.plan.apply import cap_allocator
    from quantizer.plan.memory import CUDA_CONTEXT

    total = random.randint(16, 140) << 30
    budget = random.randint(4, 15) << 30
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, i: calls.append((f, i)))
    note = cap_allocator(1, budget)
    (fraction, index), = calls
    assert index == 1 and fraction * total == pytest.approx(budget - CUDA_CONTEXT)
    assert "capped" in note and "cuda:1" in note
    cap_allocator(0, 2 * total)
    assert calls[-1] == (1.0, 0)
