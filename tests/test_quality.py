"""What the installed package gives type checkers. ruff and mypy on the codebase itself are
tool steps of ``.ci/run``, not tests."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from typecheck import mypy  # noqa: E402


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
    _, out = mypy(tmp_path, ["train.py"])
    assert "import-not-found" not in out, out
    assert 'Revealed type is "torch._tensor.Tensor"' in out, out
    # The class as mypy sees it, where it is defined (its runtime __module__ is public).
    assert re.search(r'Revealed type is "regcollect\.[\w.]*\.L2"', out), out


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


def test_pickles_record_public_module_paths_only():
    """Regularizers, schedules, collections and whole regularized models pickle under public
    module paths (regcollect, regcollect.regularizers, regcollect.nn, ...): code can move
    inside the package without breaking a checkpoint."""
    import pickle
    import re

    import torch

    import regcollect as rc

    coll = rc.Collection()
    warm = rc.schedules.warmup(0.1, 10)
    model = torch.nn.Sequential(
        rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(warm), collection=coll),
        rc.nn.Linear(3, 2, activity_regularizer=rc.l1(0.1), collection=coll),
    )
    rc.regularize(model, bias=rc.l2sp(0.5), collection=coll)
    objects = [
        rc.l2(0.3),
        rc.L2SP(0.5),
        rc.group_lasso(0.2),
        rc.orthogonal(0.1),
        rc.l1_l2(),
        rc.schedules.cosine(1.0, 0.0, 10),
        coll,
        rc.get_collection(),
        model,
    ]
    for obj in objects:
        data = pickle.dumps(obj, protocol=2)  # module paths as plain text
        private = set(re.findall(rb"regcollect(?:\.[A-Za-z0-9]+)*\._[a-z][A-Za-z0-9_.]*", data))
        assert not private, (obj, private)
        restored = pickle.loads(data)
        assert type(restored) is type(obj)


@pytest.mark.slow  # mypy over torch's stubs (warm cache: seconds; cold: about 45 s)
def test_documented_arguments_type_check_strictly(tmp_path):
    """What the docs show passes ``mypy --strict``: schedules and functions of the step as
    coefficients, regularizers by object, name, factory or function, and ``summary``'s views."""
    pytest.importorskip("mypy", reason="mypy not installed (pip install .[test])")
    (tmp_path / "train.py").write_text(
        "import torch\n"
        "import regcollect as rc\n"
        "from regcollect import schedules\n\n"
        "model = torch.nn.Sequential(\n"
        "    rc.nn.Linear(4, 4, kernel_regularizer=rc.l2(schedules.warmup(1e-4, steps=100))),\n"
        "    rc.nn.Linear(4, 2, kernel_regularizer=rc.l1(lambda step: 1e-5 * min(1, step / 10))),\n"
        ")\n"
        "rc.regularize(model, kernel=rc.l2(1e-4), bias='l1', norm=rc.l2, include=['0.*'])\n"
        "rc.regularize(model, embeddings=lambda w: w.abs().max(), exclude=['1.*'])\n"
        "rc.add_regularizer(model, '1.bias', rc.l1_l2(l1=schedules.cosine(1e-3, 0.0, steps=5)))\n"
        "table: str = rc.summary(top=3, by='module', depth=1)\n"
        "total: torch.Tensor = rc.loss(model)\n"
    )
    status, out = mypy(tmp_path, ["train.py"], "--strict")
    assert status == 0, out
