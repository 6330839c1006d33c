"""Tensor parallelism and FSDP2 x TP, run by ``test_tensor_parallel.py`` as
``torchrun --nproc_per_node=4`` (one launch for every scenario).

The 4 ranks form a (dp=2, tp=2) mesh. ``tp``: the model is tensor-parallel over the 2 ranks of
``mesh["tp"]`` (a LayerNorm under ``SequenceParallel``, a ``ColwiseParallel`` and a
``RowwiseParallel`` Linear, a plain last Linear), each tp pair training on the whole batch.
``2d``: the same, then ``fully_shard(model, mesh=mesh["dp"])`` on the root, as torchtitan-like
recipes do, each dp half of the ranks on its half of the batch. Each scenario trains the model
4 steps, ``criterion(model(x), y) + rc.loss()`` (the penalty after the forward pass), in one of
three modes (``loss``, ``attach_optimizer`` coupled, decoupled) with momentum SGD or Adam, and
the same model in this process alone on the whole batch (the reference).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from worker import everyone, main  # type: ignore[import-not-found]

import regcollect as rc

STEPS, BATCH, SEQ = 4, 4, 4


def build() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.LayerNorm(6),
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 1),
    )


def regularize(model: torch.nn.Module, coll: rc.Collection, lasso_on: int = 1) -> None:
    """L2 kernels, L1 biases, L1L2 on the norm, and a group lasso over the rows of
    ``model[lasso_on].weight`` (its groups are whole on each rank of ``ColwiseParallel``)."""
    rules = {"kernel": rc.l2(0.05), "bias": rc.l1(0.02), "norm": rc.l1_l2(l1=0.01, l2=0.02)}
    rc.regularize(model, collection=coll, **rules)
    rc.add_regularizer(model[lasso_on], "weight", rc.GroupLasso(0.05), collection=coll)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, SEQ, 6, generator=g), torch.randn(BATCH, SEQ, 1, generator=g)


def mesh2d() -> Any:
    return init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))


def parallelize(model: torch.nn.Module, setup: str) -> tuple[slice, slice]:
    """The model made tensor-parallel (and, ``2d``, fully sharded over dp); this rank's part
    of the batch, and of the sequence (``SequenceParallel`` takes its input sharded on it)."""
    mesh = mesh2d()
    plan = {"0": SequenceParallel(), "1": ColwiseParallel(), "3": RowwiseParallel()}
    parallelize_module(model, mesh["tp"], plan)  # type: ignore[arg-type]
    rank, size = mesh["tp"].get_local_rank(), mesh["tp"].size()
    seq = slice(rank * SEQ // size, (rank + 1) * SEQ // size)
    if setup == "tp":
        return slice(None), seq
    fully_shard(model, mesh=mesh["dp"])
    rank, size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    return slice(rank * BATCH // size, (rank + 1) * BATCH // size), seq


def train(
    model: torch.nn.Module, coll: rc.Collection, mode: str, optimizer: str, setup: str | None
) -> list[float]:
    """4 steps in ``mode`` with ``optimizer``; ``setup`` None: in this process alone."""
    x, y = data()
    part, seq = (slice(None), slice(None)) if setup is None else parallelize(model, setup)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.01)
    )
    if mode != "loss":
        rc.attach_optimizer(opt, decoupled=mode == "decoupled", collection=coll)
    seen = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(x[part, seq])
        penalty = coll.loss()  # after the forward pass: FSDP2's root holds unsharded ones
        (torch.nn.functional.mse_loss(out, y[part]) + penalty).backward()
        opt.step()
        seen.append(penalty.item())
    return seen


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def compare(setup: str, mode: str, optimizer: str) -> dict[str, Any]:
    """The parallel model against one process, in ``mode`` with ``optimizer``."""
    ref_coll = rc.Collection()
    ref = build()
    regularize(ref, ref_coll)
    initial = full_state(ref)
    ref_seen = train(ref, ref_coll, mode, optimizer, None)
    ref_pen = ref_coll.penalties()
    coll = rc.Collection()
    model = build()
    regularize(model, coll)
    seen = train(model, coll, mode, optimizer, setup)
    pen = coll.penalties()
    summary = io.StringIO()
    coll.summary(file=summary)
    got, want = full_state(model), full_state(ref)
    return {
        "param_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
        "moved": max(float((want[k] - initial[k]).abs().max()) for k in want),
        "penalty_diff": max(abs(a - b) for a, b in zip(seen, ref_seen)),
        "penalties_diff": max(abs(pen[k] - ref_pen[k]) for k in ref_pen),
        "names": sorted(pen),
        "reference_names": sorted(ref_pen),
        "placements": {
            n: [str(p) for p in t.placements] if isinstance(t, DTensor) else None
            for n, t in model.named_parameters()
        },
        "seen_by_rank": everyone(seen),
        "penalties_by_rank": everyone(pen),
        "summary_by_rank": everyone(summary.getvalue()),
    }


def refused_decoupled(setup: str) -> dict[str, Any]:
    """A group lasso over the rows of the ``RowwiseParallel`` weight: its placements cut every
    group, so the decoupled step cannot be exact there; one step, on every rank."""
    coll = rc.Collection()
    model = build()
    regularize(model, coll, lasso_on=3)
    error = None
    try:
        train(model, coll, "decoupled", "sgd", setup)
    except ValueError as exc:
        error = str(exc)
    return {"errors_by_rank": everyone(error)}


def refused_gradient() -> dict[str, Any]:
    """A ``Shard(0)`` parameter whose gradient is ``Replicate()``: no rule adds the coupled
    penalty's gradient to it exactly."""
    mesh = mesh2d()["tp"]
    layer = torch.nn.Linear(4, 4)
    layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
    layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.l2(0.1), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    layer.weight.grad = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
    layer.bias.grad = distribute_tensor(torch.ones(4), mesh, [Replicate()])
    error = None
    try:
        opt.step()
    except ValueError as exc:
        error = str(exc)
    return {"errors_by_rank": everyone(error)}


def scenarios() -> dict[str, Callable[[], dict[str, Any]]]:
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    for setup in ("tp", "2d"):
        for mode in ("loss", "coupled", "decoupled"):
            for optimizer in ("sgd", "adam"):
                out[f"{setup}_{mode}_{optimizer}"] = lambda s=setup, m=mode, o=optimizer: compare(
                    s, m, o
                )
        out[f"{setup}_decoupled_refused"] = lambda s=setup: refused_decoupled(s)
    out["gradient_placements_refused"] = refused_gradient
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:], scenarios())
