"""The wheel installs one import namespace: quantizer.* only, never top-level `kernels` or
`measurements` (other PyPI packages own those names; transformers imports `kernels`)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_single_namespace(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True)
    wheel = next(dist.glob("layerquant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("layerquant-")}
    assert top == {"quantizer"}, top
    for sub in ("kernels/packing.py", "calibration/sampling.py", "measurements/jobstate.py"):
        assert f"quantizer/{sub}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The new venv sees this environment's packages (torch, transformers) through a path line;
    # .pth files there (our own editable install's) are not run, so `quantizer` is the wheel's.
    site_new = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    import site
    (Path(site_new) / "_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    code = (
        "import importlib, importlib.util, quantizer\n"
        "subs = ['kernels', 'calibration', 'measurements', 'arch', 'methods', 'export']\n"
        "for s in subs: importlib.import_module('quantizer.' + s)\n"
        "import quantizer.kernels.packing, quantizer.kernels.quant_linear\n"
        f"assert quantizer.__file__.startswith({str(venv)!r}), quantizer.__file__\n"
        "from quantizer import quantize, load, evaluate\n"
        "from quantizer.cli import main\n"
        "for top in ('kernels', 'measurements', 'calibration'):\n"
        "    spec = importlib.util.find_spec(top)\n"
        f"    assert spec is None or not (spec.origin or '').startswith({str(venv)!r}), top\n"
        "print('ok')\n")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    entry = subprocess.run([str(venv / "bin" / "quantize"), "--help"], capture_output=True,
                           text=True)
    assert entry.returncode == 0 and "usage: quantize" in entry.stdout
