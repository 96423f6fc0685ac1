"""The built-in offline text: prose from the installed Python standard library's docstrings.

Every machine that runs layerquant has these files, so calibration and a quick perplexity check
need no network. The source files are *parsed* with `ast`, never imported: importing arbitrary
stdlib modules has side effects (turtle opens windows, antigravity opens a browser).

The result is deterministic for a given Python version: a fixed module list, files walked in
sorted order, definitions visited in source order, duplicates dropped in first-seen order.

Two parts, split by module so that a module's docstrings never land on both sides:
  - "builtin"      calibration: CALIBRATION_MODULES' docstrings, then the Language Reference
                   topics pydoc ships (pydoc_data/topics.py); ~0.9 MB, ~210k SmolLM2 tokens
  - "builtin-eval" held out for perplexity: EVAL_MODULES' docstrings; ~185 kB, ~44k tokens
Only paragraphs that read as prose are kept (see `prose_paragraphs`).
"""
from __future__ import annotations

import ast
import functools
import itertools
import re
import sysconfig
import textwrap
from pathlib import Path

from quantizer.errors import InputError

# Top-level stdlib modules/packages whose docstrings are read (packages: every .py under them,
# sorted, tests excluded). Names missing on a given Python version are skipped, which keeps the
# list valid from 3.10 to 3.13+. Sorted so that the order is obvious and stable.
CALIBRATION_MODULES = (
    "__future__", "_collections_abc", "_compression", "_markupbase", "_py_abc", "_pyio",
    "_sitebuiltins", "_strptime", "_threading_local", "_weakrefset", "abc", "aifc", "argparse",
    "ast", "asynchat", "asyncio", "asyncore", "base64", "bdb", "bisect", "bz2", "cProfile",
    "calendar", "cgi", "cgitb", "chunk", "cmd", "code", "codecs", "codeop", "collections",
    "colorsys", "compileall", "concurrent", "configparser", "contextlib", "contextvars", "copy",
    "copyreg", "crypt", "csv", "ctypes", "curses", "dataclasses", "datetime", "dbm", "decimal",
    "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "http", "imaplib", "imghdr", "imp", "importlib",
    "inspect", "io", "ipaddress", "json", "keyword", "linecache", "locale", "lzma", "mailbox",
    "mailcap", "mimetypes", "modulefinder", "multiprocessing", "netrc", "nntplib", "ntpath",
    "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools",
    "pipes", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile",
    "pstats", "pty", "py_compile", "pyclbr", "queue", "quopri", "random", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "site", "smtpd", "smtplib", "sndhdr", "socket", "socketserver", "sqlite3",
    "sre_compile", "sre_parse", "ssl", "stat", "statistics", "string", "stringprep", "struct",
    "subprocess", "sunau", "symtable", "sysconfig", "tabnanny", "tarfile", "telnetlib",
    "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "tty", "types", "typing", "unittest", "urllib", "uu", "uuid",
    "venv", "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xdrlib", "xml", "xmlrpc",
    "zipapp", "zipfile", "zipimport", "zoneinfo",
)
# The Python Language Reference topics that pydoc ships as one dict of strings: the largest block
# of prose in the stdlib. Read with ast.literal_eval, again without importing.
TOPICS_FILE = "pydoc_data/topics.py"
EVAL_MODULES = ("_pydecimal", "difflib", "email", "logging", "pydoc", "turtle")

_SKIP_DIRS = {"test", "tests", "__pycache__", "idle_test"}

# A line is code, not prose, when it is a doctest prompt or is dense in programming symbols.
_DOCTEST_PROMPT = re.compile(r"^\s*(>>>|\.\.\.(\s|$))")
_CODE_CHAR = re.compile(r"""[(){}\[\]=<>_*/\\|@#$%^~`;:+"']""")
_LETTER = re.compile(r"[^\W\d_]")
# a Python statement written out in a docstring: "import shelve", "d = shelve.open(name)"
_STATEMENT = re.compile(r"(import \w|from [\w.]+ import |def \w+\(|class \w+[(:]|return [\w.()]+$|raise \w+\(|print\()")
_ASSIGNMENT = re.compile(r"^[\w.\[\]]+ = \S|\w\(.*\) *#|^[\w.]+\(.*\)[;,]?$")
# reStructuredText tables, rules and headings
_MARKUP_STARTS = ("|", "+-", "+=", "==", "--", "**", "~~", "^^")
MAX_SYMBOL_SHARE = 0.15
MIN_LETTER_SHARE = 0.6
_WORD = re.compile(r"[A-Za-z]+")
MIN_PARAGRAPH_WORDS = 8
MIN_SENTENCE_WORDS = 4
MIN_DOC_CHARS = 30


def _stdlib_root() -> Path:
    root = Path(sysconfig.get_path("stdlib"))
    if not (root / "os.py").is_file():
        raise InputError(
            f"the built-in calibration text needs the standard library sources, not found in {root}; "
            "use --calib-data path/to/file.txt"
        )
    return root


def _module_files(root: Path, name: str) -> list[Path]:
    single = root / f"{name}.py"
    if single.is_file():
        return [single]
    package = root / name
    if not (package / "__init__.py").is_file():
        return []  # not present on this Python version
    files = []
    for path in sorted(package.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(package).parts[:-1]):
            files.append(path)
    return files


_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_LISTS = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstrings_in_source_order(node: ast.AST):
    """Module docstring, then each class/function's docstring depth-first in source order.

    Only statement lists are walked (docstrings cannot live inside expressions), which skips
    the vast majority of nodes of a parsed file."""
    if isinstance(node, _DEFINITIONS):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for field in _STATEMENT_LISTS:
        for child in getattr(node, field, ()):
            if isinstance(child, ast.AST):
                yield from _docstrings_in_source_order(child)


def _is_code_line(line: str) -> bool:
    stripped = line.strip()
    if _DOCTEST_PROMPT.match(line) or stripped.startswith(_MARKUP_STARTS):
        return True
    if stripped.endswith(":") and any(c in stripped for c in "(=[{"):
        return True  # a statement header such as "with open(path) as f:"
    if _STATEMENT.match(stripped) or _ASSIGNMENT.search(stripped):
        return True
    visible = len(stripped) - stripped.count(" ")
    symbols = len(_CODE_CHAR.findall(stripped))
    letters = len(_LETTER.findall(stripped))
    return symbols > MAX_SYMBOL_SHARE * visible or letters < MIN_LETTER_SHARE * visible


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one cleaned docstring (or topic text), each unwrapped onto one line.

    A paragraph is dropped whole when any of its lines is code-like or has its own indent (such
    blocks in docstrings are examples, signatures or tables; a bullet's continuation is fine),
    or when it is too short to be a sentence. Dropping whole paragraphs, not single lines, keeps
    every kept sentence intact."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in textwrap.dedent(block).split("\n") if ln.strip()]
        if not lines or any(_is_code_line(ln) for ln in lines):
            continue
        # after the block's common indent is removed, only a bullet's continuation may be indented
        hang = "  " if lines[0].startswith(("* ", "- ")) else ""
        if any(ln[len(hang):].startswith((" ", "\t")) or not ln.startswith(hang) for ln in lines[1:]):
            continue
        paragraph = " ".join(ln.strip() for ln in lines)
        words = len(_WORD.findall(paragraph))
        # a short paragraph must be a full sentence; a long one is prose even without the period
        if words >= MIN_PARAGRAPH_WORDS or (words >= MIN_SENTENCE_WORDS and paragraph[-1] in ".!?"):
            kept.append(paragraph)
    return kept


def _module_texts(root: Path, modules: tuple[str, ...]):
    for name in modules:
        for path in _module_files(root, name):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file this Python cannot parse is simply not used
            yield from _docstrings_in_source_order(tree)


def _topic_texts(root: Path):
    path = root / TOPICS_FILE
    if not path.is_file():
        return
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield topics[key]


def _documents(texts) -> list[str]:
    """One document per source text: its prose paragraphs not seen before, joined by blank lines."""
    seen: set[str] = set()
    documents = []
    for text in texts:
        paragraphs = [p for p in prose_paragraphs(text) if p not in seen]
        seen.update(paragraphs)
        document = "\n\n".join(paragraphs)
        if len(document) >= MIN_DOC_CHARS:
            documents.append(document)
    return documents


@functools.lru_cache(maxsize=None)
def _cached(part: str) -> tuple[str, ...]:
    root = _stdlib_root()
    if part == "calibration":
        texts = itertools.chain(_module_texts(root, CALIBRATION_MODULES), _topic_texts(root))
    else:
        texts = _module_texts(root, EVAL_MODULES)
    documents = tuple(_documents(texts))
    if not documents:
        raise InputError("no docstrings found in the standard library; use --calib-data path/to/file.txt")
    return documents


def builtin_documents(part: str = "calibration") -> list[str]:
    """Prose documents (one per docstring) from the stdlib: part "calibration" or "eval"."""
    if part not in ("calibration", "eval"):
        raise ValueError(f"part must be 'calibration' or 'eval', not {part!r}")
    return list(_cached(part))
