"""The built wheel works on its own: it holds the demo model, its card, the entry point and
py.typed, no tests or caches, and `onnxbn demo` runs from it in a fresh virtual environment."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], check=True,
                   capture_output=True, text=True, timeout=600)
    (path,) = out.glob("onnxbn-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "onnxbn/models/demo_vgg.onnx" in names and "onnxbn/models/README.md" in names
    assert "onnxbn/py.typed" in names and "onnxbn/torch_import/importer.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n or n.endswith(".pyc")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "onnxbn = onnxbn.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    size = zipfile.ZipFile(wheel).getinfo("onnxbn/models/demo_vgg.onnx").file_size
    assert size == (ROOT / "onnxbn" / "models" / "demo_vgg.onnx").stat().st_size


@pytest.mark.slow
def test_demo_runs_from_the_installed_wheel_in_a_fresh_venv(wheel, tmp_path):
    """A fresh venv gets only the wheel; the dependencies come from this environment through a
    .pth path entry (no editable install, no checkout on sys.path: it runs from tmp_path)."""
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(python), "-c", "import onnxbn; print(onnxbn.__file__)"], cwd=tmp_path,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site))
    version = subprocess.run([str(python), "-m", "onnxbn", "--version"], cwd=tmp_path, check=True,
                             capture_output=True, text=True).stdout
    assert version.strip() == f"onnxbn {__import__('onnxbn').__version__}"
    done = subprocess.run([str(python), "-m", "onnxbn", "demo", "--epochs", "1", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["identity"]["passed"] and report["identity"]["max_rel_error"] <= 1e-6
