"""DeepSpeed ZeRO checks, run by ``test_deepspeed.py`` as ``torchrun --nproc_per_node=2``
(gloo, CPU: ``DS_ACCELERATOR=cpu``).

ZeRO-1/2 keep whole parameters, so the penalty in the loss must give one process's weights;
what regcollect cannot do exactly under ZeRO (the attached step on its flat partitions, any
penalty on ZeRO-3's partitions) must be an error naming DeepSpeed on every rank.
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


def engine_for(model: torch.nn.Module, stage: int) -> Any:
    config = {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # its default clips at 1.0, which one plain process does not
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def in_the_loss(stage: int) -> dict[str, Any]:
    """The penalty in the loss under ZeRO-1/2 against one process on the whole batch."""
    x, y = data()
    ref_coll = rc.Collection()
    ref = build(ref_coll)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_seen = []
    for _ in range(STEPS):
        opt.zero_grad()
        penalty = ref_coll.loss()
        (torch.nn.functional.mse_loss(ref(x), y) + penalty).backward()
        opt.step()
        ref_seen.append(penalty.item())
    coll = rc.Collection()
    engine = engine_for(build(coll), stage)
    rank, world = dist.get_rank(), dist.get_world_size()
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    seen = []
    for _ in range(STEPS):
        penalty = coll.loss()
        engine.backward(torch.nn.functional.mse_loss(engine(x[half]), y[half]) + penalty)
        engine.step()
        seen.append(penalty.item())
    got = dict(engine.module.named_parameters())
    return {
        "param_diff": max(float((got[k] - p).abs().max()) for k, p in ref.named_parameters()),
        "penalty_diff": max(abs(a - b) for a, b in zip(seen, ref_seen)),
        "moved": max(
            float((p - q).abs().max()) for p, q in zip(ref.parameters(), build(None).parameters())
        ),
    }


def refused(stage: int) -> dict[str, Any]:
    """attach_optimizer under any ZeRO stage; loss() and regularize under ZeRO-3."""
    coll = rc.Collection()
    engine = engine_for(build(coll), stage)
    errors: dict[str, str | None] = {}
    attempts = {
        "attach_optimizer": lambda: rc.attach_optimizer(engine.optimizer, collection=coll),
        "attach_engine": lambda: rc.attach_optimizer(engine, collection=coll),
        "loss": coll.loss,
        "regularize": lambda: rc.regularize(
            engine_for(build(None), stage).module, kernel=rc.l2(0.1), collection=rc.Collection()
        ),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {"errors": errors}


SCENARIOS = {
    "zero1": lambda: in_the_loss(1),
    "zero2": lambda: in_the_loss(2),
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
