"""The package's import graph: every module imports in a fresh interpreter, and no module
imports, directly or through others, itself, at module level or inside a function (issue 18:
cycles hidden behind function-level imports are cycles too)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantizer"
# quantizer/__init__.py imports quantizer.api lazily (module __getattr__), for
# `from quantizer import quantize`; the package's own modules never import `quantizer` itself
# (checked below), so this edge closes no cycle.
FACADE = "quantizer"
# The layering (DESIGN.md "Layout"): arch/ (model facts: structure discovery, transformers'
# model on the meta device, expert modules) sits below every stage folder and imports none.
ARCH = "quantizer.arch"
BELOW_ARCH = ("quantizer.errors",)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if "__pycache__" in rel.parts or rel.name == "__main__.py":
            continue
        parts = ("quantizer",) + rel.with_suffix("").parts
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


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('ok', len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
