"""Nothing in the repository shadows an installed package, however Python is started in the
repository root (issue 17). transformers >= 5.25 imports the PyPI package `kernels`; when the
top-level folder kernels/ was a regular package, `python -m pytest`, `python -c`, a script or a
notebook kernel run from the root imported our folder instead and every model class failed.

The mechanism (DESIGN.md, "Imports"): the top-level folders other than quantizer/ are not
regular packages (no __init__.py), so Python's path finder only notes them as namespace
portions and takes a regular package found anywhere later on sys.path."""
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Names other PyPI packages own, or that are generic enough that one may.
TOP_FOLDERS = sorted(p.name for p in ROOT.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name != "quantizer"
                     and any(p.rglob("*.py")))


def test_no_top_level_folder_but_quantizer_is_a_regular_package():
    assert {"kernels", "calibration", "measurements", "tests"} <= set(TOP_FOLDERS)
    regular = [name for name in TOP_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert regular == [], f"{regular} would shadow installed packages of the same name"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A site directory holding regular packages named like every top-level folder, each with
    a marker attribute: stands in for the PyPI `kernels`, `measurements`, ... (installed)."""
    site = tmp_path_factory.mktemp("site")
    for name in TOP_FOLDERS:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"INSTALLED = {name!r}\n")
    return site


CHECK = ("import importlib; "
         f"names = {TOP_FOLDERS!r}; "
         "bad = [n for n in names if getattr(importlib.import_module(n), 'INSTALLED', None) != n]; "
         "assert not bad, f'shadowed by the repository: {bad}'; "
         "import quantizer.kernels.packing, quantizer.calibration.sampling, "
         "quantizer.measurements.jobstate; print('ok')")


def _run(args, site, **kw):
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


def test_python_c_in_root_sees_installed_packages(installed):
    out = _run([sys.executable, "-c", CHECK], installed)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-1500:]


def test_script_in_root_sees_installed_packages(installed):
    script = ROOT / f"_probe_{uuid.uuid4().hex[:8]}.py"   # a script's folder goes first on sys.path
    script.write_text(CHECK.replace("; ", "\n"))
    try:
        out = _run([sys.executable, str(script.name)], installed)
    finally:
        script.unlink()
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-1500:]


def test_python_m_pytest_in_root_sees_installed_packages(installed, tmp_path):
    test = tmp_path / "test_probe.py"
    test.write_text("def test_probe():\n" + textwrap.indent(CHECK.replace("; ", "\n"), "    ") + "\n")
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
               installed)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-1500:]


@pytest.mark.slow
def test_notebook_kernel_in_root_sees_installed_packages(installed):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    code = ("import sys\n"
            f"sys.path.insert(1, {str(installed)!r})\n"   # where PYTHONPATH puts it for a kernel
            + CHECK.replace("; ", "\n"))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "ok" in text, nb.cells[0].outputs


@pytest.mark.slow
def test_transformers_and_a_quantize_run_from_root(tiny_checkpoint, tmp_path):
    """The real thing, with whatever `kernels` transformers installed: model classes import and
    one end-to-end quantize runs, both started in the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", "from transformers import LlamaForCausalLM, Qwen3ForCausalLM; "
         "import transformers.integrations.hub_kernels; print('ok')"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-1500:]
    model = tiny_checkpoint("tiny-llama")
    run = subprocess.run(
        [sys.executable, "-m", "quantizer.cli", str(model), "--method", "rtn", "--bits", "4",
         "-o", str(tmp_path / "out"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").is_file()
