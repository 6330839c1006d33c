"""What the installed package gives type checkers. ruff and mypy on the codebase itself are
tool steps of ``.ci/run``, not tests."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_shipped():
    assert (ROOT / "regcollect" / "py.typed").exists()


@pytest.mark.slow  # a cold mypy run over torch's stubs: about 45 s
def test_user_code_outside_the_project_type_checks_against_the_installed_package(tmp_path):
    """With the README's editable install, mypy run on the user's own code (in another
    directory) finds the package and its types, not ``import-not-found``."""
    pytest.importorskip("mypy", reason="mypy not installed (pip install .[test])")
    (tmp_path / "train.py").write_text(
        "import regcollect as rc\nreveal_type(rc.loss())\nreveal_type(rc.l2(0.01))\n"
    )
    result = subprocess.run(
        # The project's options and cache (warm once `.ci/run`'s mypy step or an earlier run
        # filled it); the file given on the command line replaces the configured packages.
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
    assert 'Revealed type is "regcollect._l1l2.L2"' in out, out


def test_the_public_surface_is_the_api():
    """``dir(rc)`` lists the API and the public subpackages, no internal module;
    ``rc.penalties`` and ``rc.summary`` are the functions, not modules they shadow."""
    import inspect

    import regcollect as rc

    names = dir(rc)
    assert {"nn", "regularizers", "schedules", "compat", "integrations"} <= set(names)
    assert not [
        n
        for n in names
        if inspect.ismodule(getattr(rc, n))
        and n not in ("nn", "regularizers", "schedules", "compat", "integrations")
    ]
    assert not [n for n in names if n.startswith("_") and n != "__version__"]
    assert inspect.isfunction(rc.penalties) and inspect.isfunction(rc.summary)


def test_checkpoints_pickled_under_the_old_module_paths_still_load():
    """Regularizers pickled when the internal modules were public (``regcollect.penalties``,
    ``regcollect.beyond``), or before each penalty had its module (``regcollect._penalties``,
    ``regcollect._beyond``), load; new pickles name the penalty's own module."""
    import pickle

    import regcollect as rc

    for reg, new, olds in (
        (rc.l2(0.3), b"regcollect._l1l2", (b"regcollect.penalties", b"regcollect._penalties")),
        (rc.L2SP(0.5), b"regcollect._l2sp", (b"regcollect.beyond", b"regcollect._beyond")),
        (rc.group_lasso(0.2), b"regcollect._group_lasso", (b"regcollect._beyond",)),
        (rc.orthogonal(0.1), b"regcollect._orthogonal", (b"regcollect.penalties",)),
    ):
        data = pickle.dumps(reg, protocol=2)  # module paths as plain text
        assert new + b"\n" in data
        for old in olds:
            restored = pickle.loads(data.replace(new + b"\n", old + b"\n"))
            assert type(restored) is type(reg) and restored.get_config() == reg.get_config()
