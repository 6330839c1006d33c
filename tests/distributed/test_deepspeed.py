"""DeepSpeed ZeRO on 2 gloo ranks (CPU): the penalty in the loss gives one process's weights
under ZeRO-1 and 2; the attached step under any stage and any penalty under ZeRO-3 are refused
on every rank, naming DeepSpeed (before, they applied nothing or crashed silently).

One ``torchrun`` launch runs every scenario of ``deepspeed_worker.py``. DeepSpeed is the
``deepspeed`` extra (``pip install -e ".[deepspeed]"``), which ``.ci/run`` installs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.slow,  # a torchrun launch: 15-30 s
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason='DeepSpeed is not installed: pip install -e ".[deepspeed]"',
    ),
]

WORKER = Path(__file__).with_name("deepspeed_worker.py")
# 4 SGD steps; ranks sum gradients in another order than one process: 8 float32 ulps of
# weights below 1 a step (tests/conftest.py's rounding_bound).
TOL = 4 * 8 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, torchrun: Any) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("deepspeed") / "report.json"
    returncode, stdout, stderr = torchrun(
        WORKER, str(out), timeout=600, env={"DS_ACCELERATOR": "cpu"}
    )
    assert returncode == 0 and out.exists(), stdout[-4000:] + stderr[-4000:]
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("stage", [1, 2])
def test_the_penalty_in_the_loss_equals_one_process(report: Any, stage: int) -> None:
    for rank in report:
        r = rank[f"zero{stage}"]
        assert "error" not in r, r.get("error")
        assert r["moved"] > 1e-2
        assert r["param_diff"] < TOL and r["penalty_diff"] < TOL


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_what_cannot_be_exact_is_refused_naming_deepspeed(report: Any, stage: int) -> None:
    first, *others = [rank[f"zero{stage}_refused"] for rank in report]
    assert "error" not in first, first.get("error")
    assert all(other == first for other in others)  # the same on every rank
    errors = first["errors"]
    optimizer = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    for attempt in ("attach_optimizer", "attach_engine"):
        assert f"cannot apply penalties inside DeepSpeed ({optimizer})" in errors[attempt]
        assert "engine.backward(loss + rc.loss(model))" in errors[attempt]
    if stage < 3:
        assert errors["loss"] is None and errors["regularize"] is None
        return
    for attempt in ("loss", "regularize"):
        assert "'0.weight': DeepSpeed ZeRO stage 3 partitions this parameter" in errors[attempt]
        assert "(shape (12, 6), here (0,))" in errors[attempt]
        assert "Use ZeRO stage 1 or 2" in errors[attempt]
