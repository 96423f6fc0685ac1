"""The package's import graph: every module imports in a fresh interpreter, no module
imports, directly or through others, itself (issue 18: cycles hidden behind function-level
imports are cycles too), and imports sit at the top of their module: inside a function only
the few heavy or optional third-party modules of LAZY_IMPORTS, each with its reason."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantizer"
# quantizer/__init__.py imports quantizer.api lazily (module __getattr__), for
# `from quantizer import quantize`: every `import quantizer.x` runs it, and an eager import
# would load the whole pipeline (torch, transformers) for `quantize --help`. The package's own
# modules never import `quantizer` itself (checked below), so this edge closes no cycle.
FACADE = "quantizer"
FACADE_LAZY = ".api"
# The layering (DESIGN.md "Layout"): arch/ (model facts: structure discovery, transformers'
# model on the meta device, expert modules) sits below every stage folder and imports none.
ARCH = "quantizer.arch"
BELOW_ARCH = ("quantizer.errors",)
# Third-party modules a function may import (a module and its submodules), and why; every
# other import -- the package's own modules, the standard library, torch, safetensors -- is at
# the top of its module.
LAZY_IMPORTS = {
    "transformers": "seconds to import; imported where a config, tokenizer or model is built, "
                    "so a GPU run's warm-up thread (run/warmup.py) overlaps it and the CLI's "
                    "--help and refusals never pay it",
    "datasets": "optional (the `datasets` extra) and slow to import: only --calib-data with a "
                "hub dataset name needs it",
    "pynvml": "optional (nvidia-ml-py, the `gpu` extra), useful only with an NVIDIA driver: "
              "imported where NVML is asked (plan/machine.py), which answers 'unknown' "
              "without it",
}
FIRST_PARTY = ("quantizer", "kernels", "measurements", "calibration")
# Modules that need triton (the optional `gpu` extra) at import.
NEEDS_TRITON = ("quantizer.kernels.triton_dispatch", "quantizer.kernels.triton_w4a16")


def _modules() -> dict[str, Path]:
    """Every module of the package, the linked folders (quantizer/kernels, calibration,
    measurements -> the top-level folders) included."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for file in sorted(files):
            if not file.endswith(".py") or file == "__main__.py":
                continue
            path = Path(folder) / file
            parts = ("quantizer",) + path.relative_to(PACKAGE).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every quantizer module `name` imports, wherever the statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
                elif target in modules:
                    out.add(target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_even_through_function_level_imports():
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    cycles = _cycles(graph)
    assert not cycles, cycles


def test_arch_imports_nothing_above_it():
    graph = _graph()
    above = sorted(f"{n} -> {d}" for n, deps in graph.items()
                   if n == ARCH or n.startswith(ARCH + ".") for d in deps
                   if not (d == ARCH or d.startswith(ARCH + ".") or d in BELOW_ARCH))
    assert above == [], above


def test_only_the_facade_imports_the_package_root():
    importers = sorted(n for n, deps in _graph().items() if FACADE in deps and n != FACADE)
    assert importers == [], importers


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, first party) of every import statement inside a function; `from . import
    x` is module ".x"."""
    out = []

    def walk(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, a.name.split(".")[0] in FIRST_PARTY)
                           for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                dots = "." * child.level
                modules = [dots + child.module] if child.module else [
                    dots + a.name for a in child.names]
                out.extend((child.lineno, m, bool(child.level)
                            or m.split(".")[0] in FIRST_PARTY) for m in modules)
            walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text()), False)
    return out


def _lazy_allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAZY_IMPORTS)


def test_imports_sit_at_the_top_of_their_module():
    """A function-level import hides a dependency (and, once, a cycle): only LAZY_IMPORTS,
    and the facade's lazy quantizer.api, may be imported inside a function."""
    bad = []
    for name, path in _modules().items():
        for line, module, first_party in _function_level_imports(path):
            if name == FACADE and module == FACADE_LAZY:
                continue
            if first_party or not _lazy_allowed(module):
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: {module}")
    assert bad == [], "\n".join(bad)


def test_the_function_level_check_finds_one(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import json\n\ndef f():\n    from .x import y\n    import transformers\n"
                 "    from . import api\n    return lambda: __import__('os')\n\nclass C:\n"
                 "    def g(self):\n        import quantizer.errors\n")
    assert _function_level_imports(f) == [(4, ".x", True), (5, "transformers", False),
                                          (6, ".api", True), (11, "quantizer.errors", True)]
    assert _lazy_allowed("transformers.models.auto") and not _lazy_allowed("torch")


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    if importlib.util.find_spec("triton") is None:
        names = [n for n in names if n not in NEEDS_TRITON]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('ok', len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
