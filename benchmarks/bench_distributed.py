"""What the penalty costs per training step under each distributed engine, in the loss and
applied by the optimizer's step, against the optimizer's weight decay (the alternative every
engine has) and a step without either.

    python benchmarks/bench_distributed.py [--repeats 20] [--layers 16] [--width 256]

It launches itself on 2 gloo ranks (``torch.distributed.run``, CPU), then on 4 for the 2-D mesh
(FSDP2 x TP, 2 x 2). DeepSpeed ZeRO-3 is included when DeepSpeed is installed
(``pip install -e ".[deepspeed]"``).

Per engine, four copies of the same MLP (``--layers`` Linear(width, width) + Tanh) train side
by side, steps interleaved: without a penalty, with ``SGD(weight_decay=...)``, with ``rc.l2``
kernels and ``rc.l1`` biases in the loss (``rc.loss()`` after the forward pass, as the engines
that hold parameters in parts need), and the same penalties applied by the step
(``rc.attach_optimizer``, coupled; ``rc.loss()`` still in the loss, for its value). Tensor
parallelism (``tp``, ``fsdp2_tp``) alternates ``ColwiseParallel`` and ``RowwiseParallel``
Linears. Median step times on rank 0; ratios against the plain step and against weight
decay. No assertion: timings belong here, not in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

import regcollect as rc

BATCH = 32  # per rank


def mlp(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks)


def tensor_parallel(model: torch.nn.Module, mesh: Any) -> None:
    """Pairs of Linears: the first ``ColwiseParallel``, the second ``RowwiseParallel``."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    linears = [str(i) for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    plan = {
        name: ColwiseParallel() if k % 2 == 0 else RowwiseParallel()
        for k, name in enumerate(linears[: len(linears) // 2 * 2])
    }
    parallelize_module(model, mesh, plan)  # type: ignore[arg-type]


def wrap(engine: str, model: torch.nn.Module, weight_decay: float) -> tuple[Any, Any, Any]:
    """``(module to call, step function taking the loss, optimizer or None)`` for
    ``engine``."""
    if engine == "zero3":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=weight_decay)
        ds, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

        def ds_step(loss: torch.Tensor) -> None:
            ds.backward(loss)
            ds.step()

        return ds, ds_step, None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "tp":
        tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    elif engine in ("fsdp2", "fsdp2_tp"):
        if engine == "fsdp2":
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        else:
            shape = (dist.get_world_size() // 2, 2)
            mesh2d = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
            tensor_parallel(model, mesh2d["tp"])
            mesh = mesh2d["dp"]
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:  # fsdp1, fsdp1_flat: every Linear wrapped, then the root
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            use_orig_params=engine == "fsdp1",
            auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
        )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=weight_decay)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, step, opt


def run(engine: str, layers: int, width: int, repeats: int) -> dict[str, float]:
    c = 1e-4
    x = torch.randn(BATCH, width)
    variants: dict[str, Callable[[], None]] = {}
    for name in ("plain", "weight decay", "rc.loss()", "attached"):
        coll = rc.Collection()
        model = mlp(layers, width)
        if name in ("rc.loss()", "attached"):
            rc.regularize(model, kernel=rc.l2(c), bias=rc.l1(c), collection=coll)
        module, step, opt = wrap(engine, model, 2 * c if name == "weight decay" else 0.0)
        if name == "attached":
            try:
                rc.attach_optimizer(opt, collection=coll)
            except (TypeError, ValueError):  # refused: the optimizer holds flat parameters
                continue

        def one(module: Any = module, step: Any = step, coll: Any = coll, name: str = name) -> None:
            loss = module(x).square().mean()
            if name != "plain" and name != "weight decay":
                loss = loss + coll.loss()
            step(loss)

        variants[name] = one
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def launch(nproc: int, engines: list[str]) -> None:
    """This script on ``nproc`` ranks, for ``engines``."""
    from torch.distributed.run import main as torchrun

    torchrun([f"--nproc_per_node={nproc}", __file__, *sys.argv[1:], "--engines", *engines])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--engines", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" not in os.environ:  # relaunch: 2 ranks, then 4 for the 2-D mesh
        launch(2, ["ddp", "fsdp2", "tp", "fsdp1", "fsdp1_flat", "zero3"])
        launch(4, ["fsdp2_tp"])
        return
    engines = args.engines or ["ddp", "fsdp2", "tp", "fsdp1", "fsdp1_flat", "zero3"]
    try:
        if "zero3" not in engines:
            raise ImportError
        import deepspeed

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *a, **k: None  # type: ignore[attr-defined]
        deepspeed.init_distributed(dist_backend="gloo")
    except ImportError:
        engines = [e for e in engines if e != "zero3"]
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    params = sum(p.numel() for p in mlp(args.layers, args.width).parameters())
    if rank == 0:
        print(
            f"{args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.2f}M parameters, "
            f"{2 * args.layers} entries; {dist.get_world_size()} gloo ranks, batch {BATCH} "
            f"each, 1 thread each; median of {args.repeats} steps"
        )
        print(
            f"{'engine':<12} {'plain ms':>9} {'wd ms':>9} {'rc ms':>9} {'rc/plain':>9} "
            f"{'rc/wd':>7} {'att ms':>9} {'att/wd':>7}"
        )
    for engine in engines:
        t = run(engine, args.layers, args.width, args.repeats)
        if rank == 0:
            plain, wd, ours = t["plain"], t["weight decay"], t["rc.loss()"]
            att = t.get("attached", float("nan"))
            print(
                f"{engine:<12} {plain * 1e3:9.2f} {wd * 1e3:9.2f} {ours * 1e3:9.2f} "
                f"{ours / plain:9.3f} {ours / wd:7.3f} {att * 1e3:9.2f} {att / wd:7.3f}",
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
