"""regcollect under DDP or FSDP2: the same two lines as on one process, nothing else to add.

Each rank trains on its own slice of every batch. With DDP the parameters are replicated and
every rank computes the penalty locally (no communication); with FSDP2 they are sharded
DTensors and ``rc.loss()`` completes the penalty with one all-reduce. Either way the value is
the full-model penalty, the same on every rank, and the gradients are the single-process ones.
Runs on CPU with the gloo backend, or on GPUs with NCCL when there is one per rank:

    torchrun --nproc_per_node=2 examples/distributed.py [--mode ddp|fsdp2] [--steps 200]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import regcollect as rc


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 32, generator=generator)
    logits = x[:, :4].sum(dim=1) + 0.5 * torch.randn(n, generator=generator)
    return x, (logits > 0).long()


def main(mode: str = "fsdp2", steps: int = 200, log_every: int = 100) -> dict[str, float]:
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f'mode must be "ddp" or "fsdp2", got {mode!r}')
    # NCCL needs one GPU per rank; with fewer GPUs than ranks, the ranks run on the CPU.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(
        rc.nn.Linear(32, 128, kernel_regularizer=rc.l2(1e-3), bias_regularizer=rc.l1(1e-4)),
        torch.nn.ReLU(),
        rc.nn.Linear(128, 128, kernel_regularizer=rc.l1_l2(l1=1e-5, l2=1e-3)),
        torch.nn.ReLU(),
        rc.nn.Linear(128, 2, kernel_regularizer=rc.orthogonal(1e-2)),
    ).to(device)
    if mode == "ddp":
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh(device.type, (world,))  # the ranks' devices, CPU or GPU
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)  # layers built before sharding keep their penalties
        fully_shard(model, mesh=mesh)

    generator = torch.Generator().manual_seed(0)  # the same data on every rank
    x_train, y_train = make_data(2048, generator)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, steps + 1):
        index = torch.randint(0, len(x_train), (64,), generator=generator)
        mine = index[rank::world]  # this rank's share of the global batch
        data_loss = criterion(model(x_train[mine].to(device)), y_train[mine].to(device))
        total_loss = data_loss + rc.loss()  # full-model penalty, identical on every rank
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
        if rank == 0 and (step % log_every == 0 or step == steps):
            print(f"\n[{mode}, {world} ranks] step {step}: data loss {data_loss.item():.4f}")
            rc.summary(loss=total_loss)  # collective-free: values of the last rc.loss()

    result = dict(rc.penalties())
    everyone: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        same = all(other == result for other in everyone)
        print(f"\npenalties identical on all {world} ranks: {same}")
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp2"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc_per_node=2 " + __file__)
    main(mode=args.mode, steps=args.steps)
