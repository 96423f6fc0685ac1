"""Crash safety end to end: SIGKILL `quantize` at random moments in every stage, resume, and
get output files byte-identical to an uninterrupted run."""
import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from helpers import assert_same_files, quantize_cmd

STAGES = ("measure", "quantize", "export", "done")
# A coarse AWQ grid keeps the many runs short; resume does not depend on the grid's size.
METHODS = {"rtn": ["--method", "rtn"], "awq": ["--method", "awq", "--awq-grid", "5"],
           "adaptive-gptq": ["--method", "gptq", "--bits", "4.5"]}


def cmd(model, out, method, *extra):
    # a small local calibration file keeps each of the many process starts short
    return quantize_cmd(model, out, *METHODS[method], *extra)


def progress(job: Path):
    try:
        st = json.loads((job / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return STAGES.index(st["stage"]), st["last_finished"].get(st["stage"], -1)


def run_until_killed(args, job: Path, target, delay: float) -> bool:
    """Start `args`; SIGKILL it `delay` s after the job reaches `target` (stage index, layer).
    Returns False if the run finished first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        p = progress(job)
        if p is not None and p >= target:
            time.sleep(delay)
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "adaptive-gptq"])
def test_kill_anywhere_and_resume_bit_identical(method, tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=8)
    ref = tmp_path / "ref"
    subprocess.run(cmd(model, ref, method), check=True, capture_output=True)
    out, job = tmp_path / "out", tmp_path / "out.job"
    rng = random.Random(f"kill-{method}")
    kills = 0
    first = True
    while kills < 10:
        # Random points over every stage: after layer k of measure (adaptive) or quantize,
        # or inside export.
        stage = rng.choice([1, 1, 1, 2] + ([0, 0] if method == "adaptive-gptq" else []))
        target = (stage, rng.randint(-1, 7) if stage < 2 else -1)
        args = cmd(model, out, method) if first else cmd(model, out, method, "--resume")
        if out.exists():  # a kill after publishing: start over to keep counting kill points
            subprocess.run(["rm", "-rf", str(out), str(job)], check=True)
            args = cmd(model, out, method)
        if run_until_killed(args, job, target, rng.uniform(0, 0.3)):
            kills += 1
            first = False
    final = subprocess.run(cmd(model, out, method, "--resume"), capture_output=True)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    assert not job.exists(), "the job directory is removed once the output is complete"
    assert_same_files(out, ref, skip_content=())


def test_existing_job_needs_resume_or_overwrite(tiny_checkpoint, tmp_path):
    from quantizer.cli import main
    model = tiny_checkpoint("tiny-llama")
    job = tmp_path / "out.job"
    job.mkdir()
    (job / "state.json").write_text('{"schema_version": 1, "stage": "quan')  # truncated
    code = main([str(model), "-o", str(tmp_path / "out"), "--method", "rtn", "--no-progress",
                 "--calib-samples", "0"])
    assert code == 2
    code = main([str(model), "-o", str(tmp_path / "out"), "--method", "rtn", "--no-progress",
                 "--calib-samples", "0", "--resume"])
    assert code == 2  # truncated state: a clear error naming the file, not a traceback
    code = main([str(model), "-o", str(tmp_path / "out"), "--method", "rtn", "--no-progress",
                 "--calib-samples", "0", "--overwrite"])
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()


def test_resume_with_other_settings_names_the_difference(tiny_checkpoint, tmp_path, capsys):
    from quantizer.cli import main
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=3)
    out = tmp_path / "out"
    args = [str(model), "-o", str(out), "--method", "rtn", "--no-progress",
            "--calib-samples", "4", "--calib-seqlen", "16"]
    # Leave a job behind as a crash would: stop after layer 0 via a failing write hook.
    proc = subprocess.Popen(cmd(model, out, "rtn", "--calib-samples", "4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = tmp_path / "out.job"
    while proc.poll() is None and (progress(job) or (1, -1)) < (1, 0):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if not job.exists():
        pytest.skip("the run finished before it could be interrupted")
    capsys.readouterr()
    assert main(args + ["--resume", "--group-size", "64", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "group_size" in err and "seed" in err, err


@pytest.mark.slow
def test_ctrl_c_saves_state_and_resumes(tiny_checkpoint, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130 with a one-line hint, no prompt; --resume finishes
    with output identical to an uninterrupted run."""
    import signal
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=8)
    ref, out, job = tmp_path / "ref", tmp_path / "out", tmp_path / "out.job"
    subprocess.run(cmd(model, ref, "rtn"), check=True, capture_output=True)
    proc = subprocess.Popen(cmd(model, out, "rtn"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    while proc.poll() is None and (progress(job) or (1, -1)) < (1, 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130 and "--resume" in err.strip().splitlines()[-1], err[-500:]
    assert progress(job)[1] >= 2  # finished layers stayed committed
    done = subprocess.run(cmd(model, out, "rtn", "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert_same_files(out, ref, skip_content=())
