"""DeepSpeed ZeRO checks, run by ``test_deepspeed.py`` as ``torchrun --nproc_per_node=2``
(gloo, CPU: ``DS_ACCELERATOR=cpu``).

The penalty in the loss must give one process's weights under ZeRO-1, 2 and 3 (whose
parameters are partitioned across the ranks); what regcollect cannot do exactly under ZeRO
(the attached step on its flat partitions, a whole-tensor penalty on ZeRO-3's partitions, a
ZeRO-3 penalty computed before the forward pass) must be an error naming DeepSpeed on every
rank.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import deepspeed.comm.torch
import torch
import torch.distributed as dist

import regcollect as rc

STEPS, BATCH, LR = 4, 8, 0.1


def build(coll: rc.Collection | None) -> torch.nn.Module:
    torch.manual_seed(0)

    def linear(n_in: int, n_out: int, **kwargs: Any) -> torch.nn.Module:
        if coll is None:
            return torch.nn.Linear(n_in, n_out)
        return rc.nn.Linear(n_in, n_out, collection=coll, **kwargs)

    return torch.nn.Sequential(
        linear(6, 12, kernel_regularizer=rc.l2(0.05), bias_regularizer=rc.l1(0.01)),
        torch.nn.Tanh(),
        linear(12, 1, kernel_regularizer=rc.l1_l2(0.002, 0.03), bias_regularizer=rc.l2(0.1)),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


# ZeRO-3 keeps parameters below this many elements whole on every rank (its default is 1e5,
# every parameter of the test MLP), and reuses gathered ones; "partitioned" turns both off, as
# for a large model.
PARTITIONED = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}


def config_for(stage: int, accumulation: int = 1, **zero: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size() // accumulation,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # its default clips at 1.0, which one plain process does not
    }


def engine_for(model: torch.nn.Module, stage: int, accumulation: int = 1, **zero: Any) -> Any:
    config = config_for(stage, accumulation, **zero)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def gathered(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's parameters, whole (ZeRO-3 gathers them for the copy)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_shape")):
        return {k: p.detach().clone() for k, p in engine.module.named_parameters()}


def in_the_loss(
    stage: int,
    regularize: bool = False,
    init: bool = False,
    compiled: bool = False,
    accumulation: int = 1,
    **zero: Any,
) -> dict[str, Any]:
    """The penalty in the loss, computed after the forward pass, against one process on the
    whole batch. ``regularize``: plain layers, ``rc.regularize`` on the engine's module;
    ``init``: the model built under ``deepspeed.zero.Init`` (partitioned as it is built);
    ``compiled``: ``coll.loss`` under ``torch.compile``; ``accumulation``: DeepSpeed's
    gradient accumulation over that many micro-batches a step (the penalty in each, which
    DeepSpeed scales by 1 / ``accumulation``: once a step in all)."""
    x, y = data()
    rules = {"kernel": rc.l2(0.05), "bias": rc.l1(0.01)}
    ref_coll = rc.Collection()
    ref = build(None if regularize else ref_coll)
    if regularize:
        rc.regularize(ref, collection=ref_coll, **rules)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_seen = []
    for _ in range(STEPS):
        opt.zero_grad()
        penalty = ref_coll.loss()
        (torch.nn.functional.mse_loss(ref(x), y) + penalty).backward()
        opt.step()
        ref_seen.append(penalty.item())
    coll = rc.Collection()
    # The config gives float32 (Init's dtype argument falls back to a half type on a CPU).
    with deepspeed.zero.Init(enabled=init, config_dict_or_path=config_for(stage, **zero)):
        model = build(None if regularize else coll)
    engine = engine_for(model, stage, accumulation, **zero)
    if regularize:
        rc.regularize(engine.module, collection=coll, **rules)
    rank, world = dist.get_rank(), dist.get_world_size()
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = torch.compile(coll.loss, backend="eager") if compiled else coll.loss
    seen = []
    for _ in range(STEPS):
        for micro in torch.arange(half.start, half.stop).chunk(accumulation):
            out = engine(x[micro])
            penalty = loss()
            engine.backward(torch.nn.functional.mse_loss(out, y[micro]) + penalty)
            engine.step()  # an optimizer step at the last micro-batch only
        seen.append(penalty.item())
    got = gathered(engine)
    pen, ref_pen = coll.penalties(), ref_coll.penalties()
    return {
        "param_diff": max(float((got[k] - p).abs().max()) for k, p in ref.named_parameters()),
        "penalty_diff": max(abs(a - b) for a, b in zip(seen, ref_seen)),
        "penalties_diff": max(abs(pen[k] - ref_pen[k]) for k in ref_pen),
        "names": sorted(pen),
        "reference_names": sorted(ref_pen),
        "shapes": {e.name: list(e.shape or ()) for e in coll.entries()},
        "seen": seen,
        "penalties": pen,
        "moved": max(
            float((p - q).abs().max()) for p, q in zip(ref.parameters(), build(None).parameters())
        ),
    }


def refused(stage: int) -> dict[str, Any]:
    """attach_optimizer under any ZeRO stage: DeepSpeed's optimizer holds flat partitions."""
    coll = rc.Collection()
    engine = engine_for(build(coll), stage)
    errors: dict[str, str | None] = {}
    attempts = {
        "attach_optimizer": lambda: rc.attach_optimizer(engine.optimizer, collection=coll),
        "attach_engine": lambda: rc.attach_optimizer(engine, collection=coll),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {"errors": errors}


def zero3_loss_first() -> dict[str, Any]:
    """``loss()`` before the forward pass under ZeRO-3: its gradient would come after
    DeepSpeed reduced the parameters' gradients, which must be an error from the backward."""
    coll = rc.Collection()
    engine = engine_for(build(coll), 3, **PARTITIONED)
    x, y = data()
    rank = dist.get_rank()
    penalty = coll.loss()
    try:
        engine.backward(torch.nn.functional.mse_loss(engine(x[rank::2]), y[rank::2]) + penalty)
    except RuntimeError as exc:
        return {"error_message": str(exc)}
    return {"error_message": None}


def zero3_whole_tensor() -> dict[str, Any]:
    """A penalty on the whole tensor (orthogonal) on a ZeRO-3 partition: refused when
    registered after ``initialize``, and at ``loss()`` when registered before."""
    errors: dict[str, str | None] = {}
    coll = rc.Collection()
    model = build(coll)
    rc.add_regularizer(model[2], "weight", rc.orthogonal(0.1), collection=coll)
    engine = engine_for(model, 3)
    after = engine_for(build(None), 3)
    for name, attempt in {
        "loss": coll.loss,
        "add_regularizer": lambda: rc.add_regularizer(
            after.module[0], "weight", rc.orthogonal(0.1), collection=rc.Collection()
        ),
    }.items():
        try:
            attempt()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {"errors": errors, "engines": [type(engine).__name__]}


SCENARIOS = {
    "zero1": lambda: in_the_loss(1),
    "zero2": lambda: in_the_loss(2),
    "zero3": lambda: in_the_loss(3),
    "zero3_partitioned": lambda: in_the_loss(3, **PARTITIONED),
    "zero3_regularize": lambda: in_the_loss(3, regularize=True, **PARTITIONED),
    "zero3_init": lambda: in_the_loss(3, init=True, **PARTITIONED),
    "zero3_compiled": lambda: in_the_loss(3, compiled=True, **PARTITIONED),
    "zero3_accumulation": lambda: in_the_loss(3, accumulation=2, **PARTITIONED),
    "zero3_loss_first": zero3_loss_first,
    "zero3_whole_tensor": zero3_whole_tensor,
    "zero1_refused": lambda: refused(1),
    "zero2_refused": lambda: refused(2),
    "zero3_refused": lambda: refused(3),
}


def main(path: str) -> None:
    # The shared-memory op DeepSpeed compiles on its first CPU run (50-90 s, g++) is not
    # needed with gloo: skipped.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    report: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        try:
            report[name] = scenario()
        except Exception:
            report[name] = {"error": traceback.format_exc()}
        dist.barrier()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(gathered, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
