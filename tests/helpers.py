"""Helpers the test files share: one implementation each (`from helpers import ...`; pytest puts
tests/ on sys.path, as for conftest.py and family_zoo.py).

- directories: `tree_digest`, `assert_same_files` (exports byte for byte)
- tensors: `load_tensors` (every shard of a folder), `assert_same_tensors`
- the command line: `cli` (in-process, output captured), `assert_refused` (issue 25's rule for
  a refusal), `quantize_cmd` / `quantize_cli` (a process with the small calibration file),
  `job_state` / `signal_when` (a run killed at a chosen point of its job), `peak_rss_cli` (a
  process's peak RSS), `planned_host_peaks` (the host plan of a fresh process), `plan_text`
  (`quantize plan` as text).
- fixtures (tests/conftest.py) and seeding (tests/seeding.py) are pytest plugins, not here.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().with_name("data")
CALIB_FILE = DATA / "calibration.txt"  # a small local calibration text: short process starts
NOTES = "layerquant.json"  # an export's notes: they name the run's devices, plan and settings


# ---- directories --------------------------------------------------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` (relative, '/'-separated) with the SHA-256 of its content;
    directories map to 'dir'."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_files(a: Path, b: Path, skip_content: tuple[str, ...] = (NOTES,)) -> dict:
    """`a` and `b` hold the same paths with the same bytes, except the content of the files
    named in `skip_content` (by default the run's notes), which need only exist in both.
    Returns `a`'s digests."""
    da, db = tree_digest(a), tree_digest(b)
    assert sorted(da) == sorted(db), (sorted(set(da) ^ set(db)), a, b)
    differ = [k for k in da if da[k] != db[k] and Path(k).name not in skip_content]
    assert not differ, (f"{len(differ)} file(s) differ between {a} and {b}", differ)
    return da


# ---- tensors ------------------------------------------------------------------------------
def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder` (a sharded checkpoint as one)."""
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    """The same names, and each tensor the same dtype, shape and values (NaN-free)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- the command line ---------------------------------------------------------------------
def cli(argv, capsys) -> tuple[int, list[str], str]:
    """`quantize ARGV` in this process: the exit code, stderr's non-blank lines, stdout."""
    from quantizer.cli import main
    capsys.readouterr()  # only this command's output
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


def assert_refused(argv, capsys, root: Path, match: str, one_line: bool = True) -> str:
    """Issue 25's rule for a refusal: exit code 2, exactly one stderr line 'error: ...' that
    holds `match`, and everything under `root` exactly as it was (nothing new, the user's
    files untouched). Returns the line. one_line=False lets notes precede the error line (a
    refusal found once the run has started)."""
    before = tree_digest(root)
    code, err, _ = cli(argv, capsys)
    assert code == 2, err
    assert err and (len(err) == 1 or not one_line), err
    assert err[-1].startswith("error: ") and match in err[-1], err
    assert tree_digest(root) == before, "a refused run changed the disk"
    return err[-1]


def quantize_cmd(model, out, *args) -> list[str]:
    """`python -m quantizer.cli MODEL -o OUT ARGS` on the small calibration file (8 samples of
    32 tokens, no progress bar); ARGS come last, so they may override those."""
    return [sys.executable, "-m", "quantizer.cli", str(model), "-o", str(out),
            "--calib-data", str(CALIB_FILE), "--calib-samples", "8", "--calib-seqlen", "32",
            "--no-progress", *map(str, args)]


def quantize_cli(model, out, *args, env=None) -> subprocess.CompletedProcess:
    """quantize_cmd(...) --overwrite, run to its end (output captured as text)."""
    return subprocess.run([*quantize_cmd(model, out, *args), "--overwrite"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def job_state(job: Path) -> dict | None:
    """A job directory's state.json (None while it is absent or half-written)."""
    try:
        return json.loads((Path(job) / "state.json").read_text())
    except (OSError, ValueError):
        return None


def signal_when(args, job: Path, reached, delay: float = 0.0, sig=signal.SIGKILL,
                env=None) -> subprocess.CompletedProcess:
    """Run the command `args`; as soon as reached(state) holds for its job directory's
    state.json, wait `delay` seconds and send it `sig` (a kill at a chosen point of the run).
    Returns the ended process: returncode 0 if it finished first, stderr as text."""
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    while proc.poll() is None:
        state = job_state(job)
        try:
            hit = state is not None and reached(state)
        except (KeyError, IndexError, TypeError, ValueError):  # a state of another shape
            hit = False
        if hit:
            time.sleep(delay)
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    err = proc.communicate(timeout=600)[1]
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, err)


@dataclass
class PeakRun:
    returncode: int
    peak_rss: int  # bytes: the kernel's high-water mark of the command's resident set
    stdout: str
    stderr: str


def peak_rss_cli(args) -> PeakRun:
    """`python -m quantizer.cli ARGS` in a fresh process, with its peak resident set size."""
    # through a small launcher: a child forked from this (large) pytest process would report
    # this process's resident size as its own peak (see tests/data/peak_rss.py)
    with tempfile.NamedTemporaryFile("r") as rss:
        proc = subprocess.run([sys.executable, str(DATA / "peak_rss.py"), rss.name,
                               sys.executable, "-m", "quantizer.cli", *map(str, args)],
                              capture_output=True, text=True)
        peak = int(rss.read())
    return PeakRun(proc.returncode, peak, proc.stdout, proc.stderr)


def plan_text(model, bits=4, method=None, vram_budget=None, ram_budget=None, devices=None,
              calib_samples=128, calib_seqlen=512, **settings) -> str:
    """`quantize plan MODEL ...` as text, through the path the command line takes."""
    from quantizer.plan.apply import plan_command
    from quantizer.settings import QuantSettings
    s = QuantSettings().replaced(bits=bits, method=method, vram_budget=vram_budget,
                                 ram_budget=ram_budget, calib_samples=calib_samples,
                                 calib_seqlen=calib_seqlen, **settings).validated()
    return plan_command(model, s, devices)


_PLANNED = """
import json, sys
from quantizer.settings import Budgets, CalibSettings, QuantSettings
from quantizer.run.job import plan_job
model, calib, samples, seqlen, shard, *hidden = sys.argv[1:]
out = {}
for h in hidden:
    s = QuantSettings(bits=4, group_size=128, method="rtn", device="cpu", hidden_device=h,
                      calib=CalibSettings(source=calib, samples=int(samples), seqlen=int(seqlen)),
                      budgets=Budgets.parse(ram="1T"))
    out[h] = plan_job(model, s, max_shard_bytes=int(shard)).plan.predicted_peak[-1]
print(json.dumps(out))
"""


def planned_host_peaks(model, calib, samples: int, seqlen: int, max_shard_bytes: int,
                       hidden=("auto",)) -> dict[str, int]:
    """The host plan's predicted peak (bytes) of an RTN run (4 bits, group 128, CPU) for each
    hidden-state place in `hidden`, planned in a fresh process as the run is (the plan counts
    the process's own resident size)."""
    out = subprocess.run([sys.executable, "-c", _PLANNED, str(model), str(calib), str(samples),
                          str(seqlen), str(max_shard_bytes), *hidden],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
