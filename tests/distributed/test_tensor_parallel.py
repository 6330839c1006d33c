"""Tensor parallelism and FSDP2 x TP (a 2 x 2 mesh) give one process's weights and penalties
in every mode: the penalty in the loss, ``attach_optimizer`` coupled and decoupled.

One ``torchrun --nproc_per_node=4`` launch (gloo, CPU) runs every scenario of
``tp_worker.py``; each test checks one scenario of its report. Before, the attached step
crashed under TP ("got mixed torch.Tensor and DTensor") and was silently 0.02-0.08 off under
FSDP2 x TP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.slow,  # a torchrun launch of 4 ranks: about 20 s on 2 cores
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available in this build",
    ),
]

WORKER = Path(__file__).with_name("tp_worker.py")
# As in test_distributed.py: 8 float32 ulps of weights below 1 a step, over 4 steps, times
# 1 / (1 - 0.9) for momentum (Adam's update is bounded by its learning rate).
TOL = 4 * 8 * torch.finfo(torch.float32).eps / (1 - 0.9)

EXACT = [
    f"{setup}_{mode}_{optimizer}"
    for setup in ("tp", "2d")
    for mode in ("loss", "coupled", "decoupled")
    for optimizer in ("sgd", "adam")
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, torchrun: Any) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tensor_parallel") / "report.json"
    returncode, stdout, stderr = torchrun(WORKER, str(out), timeout=600, nproc=4)
    assert returncode == 0 and out.exists(), stdout[-4000:] + stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("scenario", EXACT)
def test_matches_single_process(report: dict[str, Any], scenario: str) -> None:
    r = report[scenario]
    assert "error" not in r, r.get("error")
    assert r["moved"] > 1e-2  # four steps really trained the model
    assert r["param_diff"] < TOL  # the weights
    assert r["penalty_diff"] < TOL  # every step's rc.loss() value
    assert r["penalties_diff"] < TOL  # rc.penalties() after training
    assert r["names"] == r["reference_names"]


@pytest.mark.parametrize("scenario", EXACT)
def test_every_rank_sees_the_same_values(report: dict[str, Any], scenario: str) -> None:
    r = report[scenario]
    assert "error" not in r, r.get("error")
    first, *others = r["seen_by_rank"]
    assert len(others) == 3 and all(seen == first for seen in others)  # bit-identical
    first, *others = r["penalties_by_rank"]
    assert all(p == first for p in others)
    table, *other_tables = r["summary_by_rank"]
    assert all(t == table for t in other_tables) and "total" in table


def test_the_scenarios_cover_every_placement(report: dict[str, Any]) -> None:
    """Shard, _StridedShard (FSDP2 over a tensor-parallel shard), Replicate (whose gradient
    is Partial under SequenceParallel) and plain parameters beside DTensors."""
    placements = report["2d_loss_sgd"]["placements"]
    assert placements["1.weight"] == ["_S(0, 2)", "S(0)"]
    assert placements["3.weight"] == ["S(0)", "S(1)"]
    assert placements["0.weight"] == ["S(0)", "R"]
    assert report["tp_loss_sgd"]["placements"]["5.weight"] is None  # plain under TP


@pytest.mark.parametrize(
    ("scenario", "placements", "cut"),
    [
        ("tp_decoupled_refused", "(Shard(dim=1),) on a mesh of shape (2,)", "[1]"),
        (
            "2d_decoupled_refused",
            "(Shard(dim=0), Shard(dim=1)) on a mesh of shape (2, 2)",
            "[0, 1]",
        ),
    ],
)
def test_a_decoupled_step_that_cannot_be_exact_is_refused_by_name(
    report: dict[str, Any], scenario: str, placements: str, cut: str
) -> None:
    """A group lasso over the rows of the RowwiseParallel weight: the placements cut every
    group, so no rank can soft-threshold a whole one."""
    r = report[scenario]
    assert "error" not in r, r.get("error")
    first, *others = r["errors_by_rank"]
    assert first is not None and all(e == first for e in others)  # on every rank
    assert first.startswith(
        f"attach_optimizer(decoupled=True): '3.weight' is a DTensor with placements {placements}"
    )
    assert f"split across the ranks (along dimension(s) {cut})" in first
    assert "cannot apply GroupLasso(factor=0.05, axis=0) to it exactly" in first
    assert "Attach the optimizer coupled (decoupled=False)" in first
    assert first.endswith("each rank holds the parts the penalty needs whole.")


def test_a_gradient_no_rule_maps_onto_its_parameter_is_refused_by_name(
    report: dict[str, Any],
) -> None:
    r = report["gradient_placements_refused"]
    assert "error" not in r, r.get("error")
    first, *others = r["errors_by_rank"]
    assert first is not None and all(e == first for e in others)
    assert first.startswith(
        "attach_optimizer: 'linear.weight' is a DTensor with placements (Shard(dim=0),) and "
        "its gradient has placements (Replicate(),)"
    )
    assert "p.grad = p.grad.redistribute(p.device_mesh, p.placements)" in first
