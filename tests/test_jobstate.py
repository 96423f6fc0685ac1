"""Crash safety of the job directory: atomic writes under injected disk-full, the lock against a
second process, resume / overwrite / mismatch rules, corrupt state files, fingerprints."""
import json
import multiprocessing
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from quantizer.errors import InputError
from quantizer.measurements import atomic
from quantizer.measurements.atomic import (WriteFailed, atomic_save_tensors, atomic_write_json,
                                           inject_write_failure, list_files, load_tensors)
from quantizer.measurements.fingerprint import (fingerprint_calibration, fingerprint_model,
                                                job_fingerprint)
from quantizer.measurements.jobstate import JobDir

from helpers import assert_same_tensors


def settings(**over):
    s = {"bits": 4, "group_size": 128, "method": "gptq", "calib": {"samples": 16, "seed": 0}}
    s.update(over)
    return s


def fp(model_hash="m" * 8, calib_hash="c" * 8, **over):
    return job_fingerprint(model_hash, calib_hash, settings(**over))


def rand_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (64, 48), generator=g, dtype=torch.int32),
            "scales": torch.randn(4, 48, generator=g).half(),
            "bias": torch.randn(48, generator=g).to(torch.bfloat16),
            "flag": torch.tensor(True)}


def no_temporaries(d):
    return [p for p in d.rglob("*") if atomic.is_temporary(p)] == []


# ---- atomic writes -------------------------------------------------------------------------
def test_safetensors_round_trip_and_readers_skip_temporaries(tmp_path):
    t = rand_tensors(random.randrange(10**6))
    atomic_save_tensors(tmp_path / "a.safetensors", t, {"note": "x"})
    (tmp_path / ".b.safetensors.tmp-123").write_bytes(b"partial")
    got, meta = load_tensors(tmp_path / "a.safetensors")
    assert_same_tensors(got, t)
    assert meta == {"note": "x"}
    assert [p.name for p in list_files(tmp_path, "*.safetensors")] == ["a.safetensors"]


@pytest.mark.parametrize("kind", ["json", "tensors"])
def test_injected_disk_full_keeps_previous_file(tmp_path, kind):
    path = tmp_path / ("f.json" if kind == "json" else "f.safetensors")
    old, new = rand_tensors(1), rand_tensors(2)
    if kind == "json":
        old, new = {"v": list(range(50))}, {"v": list(range(1000, 1400))}
        atomic_write_json(path, old)
    else:
        atomic_save_tensors(path, old)
    before = path.read_bytes()
    for _ in range(5):
        cut = random.randrange(0, len(before))  # the new file is larger: always cut short
        with inject_write_failure(cut), pytest.raises(WriteFailed) as e:
            (atomic_write_json if kind == "json" else atomic_save_tensors)(path, new)
        assert "intact" in str(e.value) and e.value.__cause__.errno == 28  # ENOSPC
        assert path.read_bytes() == before
        assert no_temporaries(tmp_path)
    # and without the injection the new content lands whole
    (atomic_write_json if kind == "json" else atomic_save_tensors)(path, new)
    if kind == "json":
        assert json.loads(path.read_text()) == new
    else:
        assert_same_tensors(load_tensors(path)[0], new)


# ---- job lifecycle -------------------------------------------------------------------------
def run_layers(job, stage, start, stop, hidden_seed=0):
    for i in range(start, stop):
        job.save_layer(stage, i, rand_tensors(100 + i), {"layer": i, "bits": 4})
        job.save_hidden(i + 1, [torch.full((2, 3), float(i + 1 + hidden_seed)),
                                torch.zeros(1, 3)])
        job.commit_layer(stage, i)


def test_fresh_job_layers_hidden_and_resume(tmp_path):
    d = tmp_path / "job"
    job = JobDir(d)
    job.begin(fp(), first_stage="quantize")
    job.save_hidden(0, [torch.ones(2, 3)])
    run_layers(job, "quantize", 0, 3)
    hidden = sorted(p.name for p in (d / "hidden").iterdir())
    assert hidden == ["quantize-00003.safetensors"]  # older ones are pruned after commit
    job.unlock()

    job2 = JobDir(d)
    state = job2.begin(fp(), resume=True)
    assert state["last_finished"]["quantize"] == 2 and job2.next_layer("quantize") == 3
    assert job2.load_hidden(3)[0].eq(3.0).all()
    tensors, meta = job2.load_layer("quantize", 1)
    assert_same_tensors(tensors, rand_tensors(101))
    assert meta == {"layer": 1, "bits": 4}
    job2.set_stage("export")
    assert not list((d / "hidden").iterdir())  # hidden states belong to one stage's pass
    job2.unlock()


def test_existing_job_without_resume_is_refused_and_overwrite_starts_over(tmp_path):
    d = tmp_path / "job"
    with JobDir(d) as job:
        job.begin(fp())
        run_layers(job, "measure", 0, 2)
    with pytest.raises(InputError, match="--resume.*--overwrite"):
        with JobDir(d) as job:
            job.begin(fp(), first_stage="quantize")
    with JobDir(d) as job:
        state = job.begin(fp(bits=3), overwrite=True)
        assert state["last_finished"]["measure"] == -1
        assert not (d / "layers").exists() and (d / "state.json").exists()
    with pytest.raises(InputError, match="contradict"):
        JobDir(d).begin(fp(), resume=True, overwrite=True)


def test_resume_mismatch_names_what_differs(tmp_path):
    d = tmp_path / "job"
    with JobDir(d) as job:
        job.begin(fp(), first_stage="quantize")
    g = random.choice([32, 64])
    with pytest.raises(InputError) as e, JobDir(d) as job:
        job.begin(fp(group_size=g, calib={"samples": 16, "seed": 7}), resume=True)
    msg = str(e.value)
    assert f"group_size: 128 -> {g}" in msg and "calib.seed: 0 -> 7" in msg
    assert "bits" not in msg and "model files" not in msg and "calibration set" not in msg
    with pytest.raises(InputError) as e, JobDir(d) as job:
        job.begin(fp(model_hash="other", calib_hash="different"), resume=True)
    assert "model files differ" in str(e.value) and "calibration set differs" in str(e.value)
    with pytest.raises(InputError, match=r"act_order: \(not set\) -> true"), JobDir(d) as job:
        job.begin(fp(act_order=True), resume=True)


def test_non_job_directory_is_never_used_or_wiped(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(InputError, match="not a layerquant job directory"), \
                JobDir(tmp_path) as job:
            job.begin(fp(), **kw)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def hold_lock(path, locked, release):
    job = JobDir(path)
    job.lock()
    locked.set()
    release.wait(60)


def test_second_process_gets_a_clear_lock_error(tmp_path):
    d = tmp_path / "job"
    ctx = multiprocessing.get_context("fork")  # the child only takes a lock: no torch work
    locked, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=hold_lock, args=(d, locked, release))
    proc.start()
    try:
        assert locked.wait(30)
        with pytest.raises(InputError, match=f"job directory {d} is in use by pid {proc.pid}"):
            JobDir(d).begin(fp(), first_stage="quantize")
    finally:
        proc.kill()  # killed, not released: the kernel must drop its lock
        proc.join()
    with JobDir(d) as job:  # no stale lock after the holder died
        job.begin(fp(), first_stage="quantize")


def test_temporaries_of_a_killed_writer_are_removed(tmp_path):
    d = tmp_path / "job"
    with JobDir(d) as job:
        job.begin(fp(), first_stage="quantize")
        run_layers(job, "quantize", 0, 1)
    (d / "layers" / ".quantize-00001.safetensors.tmp-99999").write_bytes(b"half a layer")
    with JobDir(d) as job:
        job.begin(fp(), resume=True)
    assert no_temporaries(d)


# ---- broken state --------------------------------------------------------------------------
def make_job(d, layers=3):
    with JobDir(d) as job:
        job.begin(fp(), first_stage="quantize")
        run_layers(job, "quantize", 0, layers)


def test_truncated_state_names_file_and_line(tmp_path):
    d = tmp_path / "job"
    make_job(d)
    text = (d / "state.json").read_text()
    cut = random.randrange(len(text) // 3, len(text) - 3)
    (d / "state.json").write_text(text[:cut])
    with pytest.raises(InputError) as e, JobDir(d) as job:
        job.begin(fp(), resume=True)
    msg = str(e.value)
    assert str(d / "state.json") in msg and "line" in msg and "column" in msg
    # a hand edit that breaks the syntax in the middle names that line
    lines = text.splitlines()
    k = random.randrange(2, len(lines) - 2)
    lines[k] = lines[k] + " oops"
    (d / "state.json").write_text("\n".join(lines))
    with pytest.raises(InputError, match=f"line {k + 1} column"), JobDir(d) as job:
        job.begin(fp(), resume=True)


def test_wrong_schema_version(tmp_path):
    d = tmp_path / "job"
    make_job(d)
    state = json.loads((d / "state.json").read_text())
    state["schema_version"] = 99
    (d / "state.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match=r"state.json has schema version 99.*reads version 1"):
        JobDir(d).begin(fp(), resume=True)


@pytest.mark.parametrize("edit", [
    lambda st: st.update(stage="bogus"),
    lambda st: st["last_finished"].update(quantize="2"),
    lambda st: st.pop("fingerprint"),
    lambda st: st["layer_files"].pop("export"),
    lambda st: st.update(hidden={"stage": "quantize"}),
])
def test_hand_edited_state_with_wrong_fields(tmp_path, edit):
    d = tmp_path / "job"
    make_job(d)
    state = json.loads((d / "state.json").read_text())
    edit(state)
    (d / "state.json").write_text(json.dumps(state, indent=1))
    with pytest.raises(InputError, match=rf"job state {d / 'state.json'} is invalid: .*--overwrite"):
        JobDir(d).begin(fp(), resume=True)


def test_missing_or_foreign_layer_file(tmp_path):
    d = tmp_path / "job"
    make_job(d)
    victim = d / "layers" / f"quantize-{random.randrange(3):05d}.safetensors"
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(InputError, match=f"{victim}.*missing"):
        JobDir(d).begin(fp(), resume=True)
    # the same file copied from another job with other settings is refused too
    other = tmp_path / "other"
    with JobDir(other) as job:
        job.begin(fp(bits=3), first_stage="quantize")
        run_layers(job, "quantize", 0, 3)
    victim.write_bytes((other / "layers" / victim.name).read_bytes())
    with pytest.raises(InputError, match="does not belong to this job"):
        JobDir(d).begin(fp(), resume=True)
    victim.write_bytes(saved[: len(saved) // 2])  # truncated by hand
    with pytest.raises(InputError, match=f"{victim}.*(corrupt|truncated)"):
        JobDir(d).begin(fp(), resume=True)


def test_disk_full_mid_job_leaves_a_resumable_job(tmp_path):
    d = tmp_path / "job"
    job = JobDir(d)
    job.begin(fp(), first_stage="quantize")
    run_layers(job, "quantize", 0, 2)
    with inject_write_failure(random.randrange(0, 4000)), pytest.raises(WriteFailed):
        run_layers(job, "quantize", 2, 4)
    job.unlock()
    with JobDir(d) as job2:
        job2.begin(fp(), resume=True)
        nxt = job2.next_layer("quantize")
        assert nxt in (2, 3)  # the failure hit layer 2's files or layer 3's
        assert job2.load_hidden(nxt)[0].eq(float(nxt)).all()
        run_layers(job2, "quantize", nxt, 4)
        for i in range(4):
            assert_same_tensors(job2.load_layer("quantize", i)[0], rand_tensors(100 + i))


# ---- fingerprints --------------------------------------------------------------------------
def test_model_fingerprint_sees_config_header_and_data_changes(tmp_path):
    g = torch.Generator().manual_seed(random.randrange(10**6))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    w = {"a.weight": torch.randn(256, 64, generator=g), "b.weight": torch.randn(64, generator=g)}
    save_file(w, tmp_path / "model.safetensors")
    base = fingerprint_model(tmp_path)
    assert fingerprint_model(tmp_path) == base
    save_file({**w, "a.weight": w["a.weight"] + 1}, tmp_path / "model.safetensors")
    assert fingerprint_model(tmp_path) != base  # same header, different data at sample 0
    save_file(w, tmp_path / "model.safetensors")
    assert fingerprint_model(tmp_path) == base
    save_file({**w, "a.weight": w["a.weight"].half()}, tmp_path / "model.safetensors")
    assert fingerprint_model(tmp_path) != base
    save_file(w, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 9}))
    assert fingerprint_model(tmp_path) != base

    tokens = torch.randint(0, 1000, (4, 32), generator=g)
    c = fingerprint_calibration(tokens)
    assert fingerprint_calibration(tokens.clone()) == c
    assert fingerprint_calibration(tokens[:3]) != c
    changed = tokens.clone()
    changed[random.randrange(4), random.randrange(32)] += 1
    assert fingerprint_calibration(changed) != c


# ---- SIGKILL at random moments -------------------------------------------------------------
WORKER = textwrap.dedent("""
    import sys, time, torch
    from quantizer.measurements.jobstate import JobDir
    from quantizer.measurements.fingerprint import job_fingerprint

    def work(path, layers, pause):
        job = JobDir(path)
        job.begin(job_fingerprint("m", "c", {"bits": 4}), resume=True, first_stage="quantize")
        start = job.next_layer("quantize")
        if start == 0 and not job.has_hidden(0):
            job.save_hidden(0, [torch.arange(4 * 65536, dtype=torch.float32).view(4, -1)])
        print("working", flush=True)
        for i in range(start, layers):
            h = job.load_hidden(i)[0]
            g = torch.Generator().manual_seed(i)
            out = h * 0.5 + torch.randn(h.shape, generator=g)  # depends on every earlier layer
            time.sleep(pause)
            job.save_layer("quantize", i, {"w": out.half(), "s": out.sum(1)}, {"i": i})
            time.sleep(pause)
            job.save_hidden(i + 1, [out])
            time.sleep(pause)
            job.commit_layer("quantize", i)
        job.finish()
        job.unlock()

    if __name__ == "__main__":
        work(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
""")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_byte_identical(tmp_path):
    layers = 8
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    scope: dict = {}
    exec(WORKER, scope)  # the same code in this process for the reference and the finish
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    scope["work"](ref, layers, 0.0)
    kills = 0
    for _ in range(2):  # each start pays a torch import: two kills keep the test short
        proc = subprocess.Popen([sys.executable, str(worker), str(killed), str(layers), "0.01"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "working"
        time.sleep(random.uniform(0, 0.25))  # the run takes ~8 × 3 × 10 ms plus writes
        kills += proc.poll() is None
        proc.kill()
        proc.wait()
    assert kills >= 1  # at least one kill landed mid-run
    scope["work"](killed, layers, 0.0)
    state = json.loads((killed / "state.json").read_text())
    assert state["stage"] == "done" and state["last_finished"]["quantize"] == layers - 1
    for i in range(layers):
        name = f"layers/quantize-{i:05d}.safetensors"
        assert (killed / name).read_bytes() == (ref / name).read_bytes(), name
    assert no_temporaries(killed)
