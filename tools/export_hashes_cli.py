"""Byte-identity check for refactors: quantize a fixed set of runs with the tree at --repo
(RTN / AWQ / GPTQ x awq / gptq / compressed-tensors, on a random-weight tiny Llama and on
stories260K from ../shared when present) and write one SHA-256 per exported file, or the
refusal line of a run that refuses, to a JSON file. Two trees give the same JSON exactly when
their exports are byte-identical.

    python tools/export_hashes_cli.py --repo /path/to/tree --out before.json
    python tools/export_hashes_cli.py --repo . --out after.json
    diff before.json after.json

Every run is `python -m quantizer.cli` with the tree on PYTHONPATH, on the CPU (or
`--device cuda`), 8 x 64 builtin calibration tokens, so it works on any tree whose command
line has these flags."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
FORMATS = ("awq", "gptq", "compressed-tensors")
# cases beyond the defaults: the rounding options (issue 20) -> extra flags
EXTRA = {"rtn+imatrix/awq": ("rtn", "awq", ("--scale-search", "imatrix")),
         "gptq+minmax+residual/gptq": ("gptq", "gptq", ("--scale-search", "minmax",
                                                        "--token-weights", "residual")),
         "awq+outliers/awq": ("awq", "awq", ("--token-weights", "outliers"))}
STORIES = Path("/work/shared/data/stories260K/hf")  # or --stories
WRITE_TINY = ("import sys\n"
              "try:\n"
              "    from quantizer.demo.synthetic import write_checkpoint\n"
              "except ImportError:\n"
              "    from quantizer.synthetic import write_checkpoint\n"
              "write_checkpoint(sys.argv[1], preset='tiny-llama')\n")


def _env(repo: Path, device: str = "cpu") -> dict:
    hide = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    return {**os.environ, "PYTHONPATH": str(repo), **hide}


def _hashes(directory: Path, tmp: str | None = None) -> dict:
    """SHA-256 per file; layerquant.json (the run's record: source path, seconds) is kept as
    text with the temporary directory and the timings masked, so a difference is readable."""
    out: dict = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        name = str(p.relative_to(directory))
        if name == "layerquant.json":
            record = json.loads(p.read_text().replace(tmp or "\0", "<tmp>"))
            out[name] = _masked(record)
        else:
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _masked(value):
    if isinstance(value, str) and value.startswith("memory plan:"):
        return "<memory plan: the machine's free memory>"
    if isinstance(value, dict):
        return {k: ("<varies>" if any(w in k for w in ("second", "time", "date", "peak", "rss"))
                    else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _run(repo: Path, model: Path, out: Path, method: str, fmt: str,
         flags: tuple[str, ...] = (), device: str = "cpu") -> dict:
    cmd = [sys.executable, "-m", "quantizer.cli", str(model), "-o", str(out), "--method", method,
           "--format", fmt, "--bits", "4", "--device", device, "--calib-samples", "8",
           "--calib-seqlen", "64", "--no-progress", *flags]
    done = subprocess.run(cmd, cwd=repo, env=_env(repo, device), capture_output=True, text=True,
                          timeout=900)
    if done.returncode:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        last = lines[-1] if lines else ""
        return {"exit": done.returncode, "refusal": last.replace(str(out.parent), "<tmp>")}
    return {"exit": 0, "files": _hashes(out, str(out.parent))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--repo", default=".", help="the tree to test (default: here)")
    p.add_argument("--out", required=True, help="JSON file of the hashes")
    p.add_argument("--only", default=None, help="comma-separated METHOD/FORMAT cases")
    p.add_argument("--stories", default=str(STORIES), help="stories260K (hf) directory; "
                   "skipped when absent")
    p.add_argument("--device", default="cpu", help="where the runs quantize (default cpu; "
                   "cuda compares two trees on one GPU)")
    a = p.parse_args(argv)
    repo = Path(a.repo).resolve()
    only = set(a.only.split(",")) if a.only else None
    results = {}
    with tempfile.TemporaryDirectory(prefix="export-hashes-") as tmp:
        tiny = Path(tmp) / "tiny-llama"
        subprocess.run([sys.executable, "-c", WRITE_TINY, str(tiny)], cwd=repo,
                       env=_env(repo), check=True)
        results["tiny-llama/input"] = {"files": _hashes(tiny)}
        models = {"tiny-llama": tiny}
        if (Path(a.stories) / "config.json").is_file():
            models["stories260K"] = Path(a.stories)
        cases = {f"{m}/{f}": (m, f, ()) for m in METHODS for f in FORMATS} | EXTRA
        for name, model in models.items():
            for case, (method, fmt, flags) in cases.items():
                if only and case not in only:
                    continue
                out = Path(tmp) / f"{name}-{case.replace('/', '-')}"
                results[f"{name}/{case}"] = _run(repo, model, out, method, fmt, flags, a.device)
                print(name, case, results[f"{name}/{case}"].get("exit"), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
