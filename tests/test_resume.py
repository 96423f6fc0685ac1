"""Crash safety end to end: SIGKILL `quantize` at random moments in every stage, resume, and
get output files byte-identical to an uninterrupted run."""
import random
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import assert_same_files, job_state, quantize_cmd, signal_when

STAGES = ("measure", "quantize", "export", "done")
# A coarse AWQ grid keeps the many runs short; resume does not depend on the grid's size.
METHODS = {"rtn": ["--method", "rtn"], "awq": ["--method", "awq", "--awq-grid", "5"],
           "adaptive-gptq": ["--method", "gptq", "--bits", "4.5"]}


def cmd(model, out, method, *extra):
    # a small local calibration file keeps each of the many process starts short
    return quantize_cmd(model, out, *METHODS[method], *extra)


def progress(state: dict) -> tuple[int, int]:
    """(stage index, last layer finished in that stage) of a job's state.json."""
    return STAGES.index(state["stage"]), state["last_finished"].get(state["stage"], -1)


def run_until_killed(args, job: Path, target, delay: float) -> bool:
    """Start `args`; SIGKILL it `delay` s after the job reaches `target` (stage index, layer).
    Returns False if the run finished first."""
    res = signal_when(args, job, lambda st: progress(st) >= target, delay)
    assert res.returncode in (0, -signal.SIGKILL), res.stderr[-2000:]
    return res.returncode != 0


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


@pytest.mark.slow
def test_resume_with_other_settings_names_the_difference(tiny_checkpoint, tmp_path, capsys):
    from quantizer.cli import main
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=3)
    out = tmp_path / "out"
    args = [str(model), "-o", str(out), "--method", "rtn", "--no-progress",
            "--calib-samples", "4", "--calib-seqlen", "16"]
    # Leave a job behind as a crash would: killed once layer 0 is committed.
    job = tmp_path / "out.job"
    signal_when(cmd(model, out, "rtn", "--calib-samples", "4"), job,
                lambda st: progress(st) >= (1, 0))
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
    model = tiny_checkpoint("tiny-llama", num_hidden_layers=8)
    ref, out, job = tmp_path / "ref", tmp_path / "out", tmp_path / "out.job"
    subprocess.run(cmd(model, ref, "rtn"), check=True, capture_output=True)
    res = signal_when(cmd(model, out, "rtn"), job, lambda st: progress(st) >= (1, 2),
                      sig=signal.SIGINT)
    err = res.stderr
    if res.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert res.returncode == 130 and "--resume" in err.strip().splitlines()[-1], err[-500:]
    assert progress(job_state(job))[1] >= 2  # finished layers stayed committed
    done = subprocess.run(cmd(model, out, "rtn", "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert_same_files(out, ref, skip_content=())
