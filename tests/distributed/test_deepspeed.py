"""DeepSpeed ZeRO on 2 gloo ranks (CPU): the penalty in the loss gives one process's weights
under ZeRO-1, 2 and 3, with the same values on every rank; the attached step under any stage,
a whole-tensor penalty on ZeRO-3's partitions and a ZeRO-3 penalty computed before the forward
pass are errors on every rank, naming DeepSpeed (before, they applied nothing, gave 0.0 or
crashed the backward).

One ``torchrun`` launch runs every scenario of ``deepspeed_worker.py``. DeepSpeed is the
``deepspeed`` extra (``pip install -e ".[deepspeed]"``), which ``.ci/run`` installs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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
TRAINER_WORKER = Path(__file__).with_name("trainer_worker.py")
# 4 SGD steps; ranks sum gradients in another order than one process: 8 float32 ulps of
# weights below 1 a step (tests/conftest.py's rounding_bound).
TOL = 4 * 8 * torch.finfo(torch.float32).eps
SHAPES = {"0.weight": [12, 6], "0.bias": [12], "2.weight": [1, 12], "2.bias": [1]}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, torchrun: Any) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("deepspeed") / "report.json"
    returncode, stdout, stderr = torchrun(
        WORKER, str(out), timeout=600, env={"DS_ACCELERATOR": "cpu"}
    )
    assert returncode == 0 and out.exists(), stdout[-4000:] + stderr[-4000:]
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize(
    "scenario",
    [
        "zero1",
        "zero2",
        # ZeRO-3 keeps these small parameters whole on every rank (persistence threshold)...
        "zero3",
        # ... and here partitions them, as a large model's: no rank holds a whole parameter.
        "zero3_partitioned",
        "zero3_regularize",  # rc.regularize on the engine's module: rules see ds_shape
        "zero3_init",  # built under deepspeed.zero.Init, rc.nn layers
        "zero3_compiled",  # loss() under torch.compile: the eager loss() runs
        "zero3_accumulation",  # 2 micro-batches a step: the penalty's gradient in each
    ],
)
def test_the_penalty_in_the_loss_equals_one_process(report: Any, scenario: str) -> None:
    for rank in report:
        r = rank[scenario]
        assert "error" not in r, r.get("error")
        assert r["moved"] > 1e-2
        assert r["param_diff"] < TOL and r["penalty_diff"] < TOL
        assert r["penalties_diff"] < TOL and r["names"] == r["reference_names"]
        assert r["shapes"] == SHAPES  # the model's, not the partitions' (0,)
    first, *others = [(rank[scenario]["seen"], rank[scenario]["penalties"]) for rank in report]
    assert all(other == first for other in others)  # bit-identical values on every rank


def test_zero3_loss_before_the_forward_pass_is_an_error_from_the_backward(report: Any) -> None:
    """Its gradient would arrive after DeepSpeed reduced the parameters' gradients: said so,
    on every rank, instead of a step without the penalty."""
    for rank in report:
        message = rank["zero3_loss_first"]["error_message"]
        assert message is not None
        assert "arrived after DeepSpeed ZeRO-3 had reduced the parameter's gradient" in message
        assert "compute rc.loss() after the model's forward pass" in message


def test_zero3_refuses_whole_tensor_penalties(report: Any) -> None:
    first, *others = [rank["zero3_whole_tensor"] for rank in report]
    assert "error" not in first, first.get("error")
    assert all(other == first for other in others)
    for attempt, name in [("loss", "entry '2.weight'"), ("add_regularizer", "'0.weight'")]:
        message = first["errors"][attempt]
        assert f"{name}: DeepSpeed ZeRO-3 holds this parameter in parts across the ranks" in message
        assert "Orthogonal(factor=0.1, mode='rows') needs the whole tensor" in message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_attached_step_is_refused_naming_deepspeed(report: Any, stage: int) -> None:
    first, *others = [rank[f"zero{stage}_refused"] for rank in report]
    assert "error" not in first, first.get("error")
    assert all(other == first for other in others)  # the same on every rank
    errors = first["errors"]
    optimizer = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    for attempt in ("attach_optimizer", "attach_engine"):
        assert f"cannot apply penalties inside DeepSpeed ({optimizer})" in errors[attempt]
        assert "engine.backward(criterion(engine(x), y) + rc.loss())" in errors[attempt]
        assert "exact under every ZeRO stage" in errors[attempt]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory, torchrun: Any) -> Path:
    pytest.importorskip("transformers", reason='pip install -e ".[transformers]"')
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    out = tmp_path_factory.mktemp("trainer")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, str(TRAINER_WORKER), "reference", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    returncode, stdout, stderr = torchrun(
        TRAINER_WORKER, "zero2,zero3", str(out), timeout=600, env={"DS_ACCELERATOR": "cpu"}
    )
    assert returncode == 0, stdout[-4000:] + stderr[-4000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_regularized_trainer_under_deepspeed_equals_one_process(
    trainer_runs: Path, stage: int
) -> None:
    """RegularizedTrainer with a DeepSpeed config (the usual way to DeepSpeed): the weights
    and the logged penalties of one process, on every rank."""
    reference = torch.load(trainer_runs / "reference.rank0.pt")
    initial = torch.load(trainer_runs / "initial.pt")
    logged = json.loads((trainer_runs / "reference.rank0.json").read_text())
    assert len(logged) == 4 and logged[0] > 0
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-3
    for rank in (0, 1):
        got = torch.load(trainer_runs / f"zero{stage}.rank{rank}.pt")
        assert got.keys() == reference.keys()
        assert max(float((got[k] - reference[k]).abs().max()) for k in reference) < TOL
        seen = json.loads((trainer_runs / f"zero{stage}.rank{rank}.json").read_text())
        assert max(abs(a - b) for a, b in zip(seen, logged, strict=True)) < TOL
