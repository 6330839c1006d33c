"""The codebase stays ruff- and mypy-clean; both run as part of the test suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install .[test])")
def test_ruff_clean():
    result = subprocess.run(
        ["ruff", "check", "regcollect", "tests", "examples", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean():
    pytest.importorskip("mypy", reason="mypy not installed (pip install .[test])")
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_py_typed_shipped():
    assert (ROOT / "regcollect" / "py.typed").exists()


def test_user_code_outside_the_project_type_checks_against_the_installed_package(tmp_path):
    """With the README's editable install, mypy run on the user's own code (in another
    directory) finds the package and its types, not ``import-not-found``."""
    pytest.importorskip("mypy", reason="mypy not installed (pip install .[test])")
    (tmp_path / "train.py").write_text(
        "import regcollect as rc\nreveal_type(rc.loss())\nreveal_type(rc.l2(0.01))\n"
    )
    result = subprocess.run(
        # The project's options and cache (warm after test_mypy_clean): torch's analysis is
        # reused; the file given on the command line replaces the configured packages.
        [
            sys.executable,
            "-m",
            "mypy",
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "train.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    out = result.stdout + result.stderr
    assert "import-not-found" not in out, out
    assert 'Revealed type is "torch._tensor.Tensor"' in out, out
    assert 'Revealed type is "regcollect.penalties.L2"' in out, out
