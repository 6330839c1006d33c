"""What the penalty in the loss costs per training step under each distributed engine, against
the optimizer's weight decay (the alternative every engine has) and a step without either.

    python benchmarks/bench_distributed.py [--repeats 20] [--layers 16] [--width 256]

It launches itself on 2 gloo ranks (``torch.distributed.run``, CPU). DeepSpeed ZeRO-3 is
included when DeepSpeed is installed (``pip install -e ".[deepspeed]"``).

Per engine, three copies of the same MLP (``--layers`` Linear(width, width) + Tanh) train side
by side, steps interleaved: without a penalty, with ``SGD(weight_decay=...)``, and with
``rc.l2`` kernels and ``rc.l1`` biases in the loss (``rc.loss()`` after the forward pass, as the
engines that hold parameters in parts need). Median step times on rank 0; ratios against
the plain step and against weight decay. No assertion: timings belong here, not in tests.
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


def wrap(engine: str, model: torch.nn.Module, weight_decay: float) -> tuple[Any, Any]:
    """``(module to call, step function taking the loss)`` for ``engine``."""
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

        return ds, ds_step
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
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

    return model, step


def run(engine: str, layers: int, width: int, repeats: int) -> dict[str, float]:
    c = 1e-4
    x = torch.randn(BATCH, width)
    variants: dict[str, Callable[[], None]] = {}
    for name in ("plain", "weight decay", "rc.loss()"):
        coll = rc.Collection()
        model = mlp(layers, width)
        if name == "rc.loss()":
            rc.regularize(model, kernel=rc.l2(c), bias=rc.l1(c), collection=coll)
        module, step = wrap(engine, model, 2 * c if name == "weight decay" else 0.0)

        def one(module: Any = module, step: Any = step, coll: Any = coll, name: str = name) -> None:
            loss = module(x).square().mean()
            if name == "rc.loss()":
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    if "RANK" not in os.environ:  # relaunch on 2 ranks
        from torch.distributed.run import main as torchrun

        torchrun(["--nproc_per_node=2", __file__, *sys.argv[1:]])
        return
    engines = ["ddp", "fsdp2", "fsdp1", "fsdp1_flat"]
    try:
        import deepspeed

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *a, **k: None  # type: ignore[attr-defined]
        deepspeed.init_distributed(dist_backend="gloo")
        engines.append("zero3")
    except ImportError:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    params = sum(p.numel() for p in mlp(args.layers, args.width).parameters())
    if rank == 0:
        print(
            f"{args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.2f}M parameters, "
            f"{2 * args.layers} entries; 2 gloo ranks, batch {BATCH} each, 1 thread each; "
            f"median of {args.repeats} steps"
        )
        print(
            f"{'engine':<12} {'plain ms':>9} {'wd ms':>9} {'rc ms':>9} {'rc/plain':>9} {'rc/wd':>7}"
        )
    for engine in engines:
        t = run(engine, args.layers, args.width, args.repeats)
        if rank == 0:
            plain, wd, ours = t["plain"], t["weight decay"], t["rc.loss()"]
            print(
                f"{engine:<12} {plain * 1e3:9.2f} {wd * 1e3:9.2f} {ours * 1e3:9.2f} "
                f"{ours / plain:9.3f} {ours / wd:7.3f}",
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
