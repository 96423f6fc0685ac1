"""The package's functions stay short (issue 18): none over MAX_LINES lines, from its `def` to
its last line (decorators not counted, nested functions counted in their parent too), so each
reads as one step of the algorithm. Covers quantizer/ and the top-level kernels/,
measurements/ and calibration/ (quantizer/kernels etc. are links to them: each file once)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("quantizer", "kernels", "measurements", "calibration")
MAX_LINES = 60


def _files() -> list[Path]:
    seen, out = set(), []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            real = path.resolve()
            if "__pycache__" in path.parts or real in seen:
                continue
            seen.add(real)
            out.append(real)
    return out


def _long_functions() -> dict[str, int]:
    """{'path:name': lines} of every function over MAX_LINES lines."""
    found = {}
    for path in _files():
        rel = path.relative_to(ROOT.resolve()).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found[f"{rel}:{node.name}"] = lines
    return found


def test_the_package_is_read():
    files = {p.relative_to(ROOT.resolve()).as_posix() for p in _files()}
    for expected in ("quantizer/api.py", "kernels/triton_w4a16.py",
                     "measurements/optimizer.py", "calibration/sampling.py"):
        assert expected in files
    # quantizer/kernels is a link to kernels/: its files are read once, under kernels/
    assert not any(f.startswith("quantizer/kernels/") for f in files)


def test_no_function_is_over_the_limit():
    offenders = _long_functions()
    assert not offenders, "functions over %d lines (split them into named steps): %s" % (
        MAX_LINES, ", ".join(f"{k} ({v})" for k, v in sorted(offenders.items(),
                                                            key=lambda kv: -kv[1])))
