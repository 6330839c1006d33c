"""Completing elementwise sums of tensors whose values are spread over the ranks (DTensor
shards, FSDP1 shards, parts ZeRO-3 holds: their placement's ``reduce_over``).

* L1/L2 terms are sums over elements, so each rank computes them on its local shard, in the
  same grouped kernels, and the partial values of every sharded tensor are summed across the
  ranks that hold the shards with **one** all-reduce per ``loss()`` (one per sharded mesh
  dimension, so one for FSDP2 and HSDP). The all-reduce is outside autograd: each rank's
  gradient is the gradient of its own shard's partial penalty, which is exactly the shard of
  the full penalty's gradient, with no factor of the world size. The all-reduced vector has a
  layout every rank shares (``Layout``): slots for each sharded tensor the caller
  registered, trained here or not, and a count of the ranks training it, so ranks that
  disagree (a parameter frozen on one rank) get an error instead of a mismatched collective.
* Other regularizers (orthogonal, custom) need the whole tensor: it is gathered
  (``full_tensor()``, one all-gather per such tensor), every rank computes the same value, and
  the gathered tensor's backward hands each rank the gradient of its own shard
  (``ContiguousGrad``).

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .._torch_compat import is_compiling
from .placement import Placed

__all__ = ["GroupAxis", "Layout", "ShardedGroup", "all_reduce", "layouts"]


class ShardedGroup(Protocol):
    """What a layout reads of a plan's group: for each of its tensors, the plan index and the
    position of the group's term among that tensor's elementwise terms."""

    positions: list[int]
    indices: list[int]
    tensors: list[torch.Tensor]
    reduce_over: tuple[Any, ...]


class Layout:
    """The all-reduce vector of one set of mesh dimensions, the same on every rank.

    ``width + 1`` slots per sharded tensor registered (trained on this rank or not), in
    registration order: the partial value of each of its elementwise terms (``width``: the
    most any of them has, the same on every rank, since every rank registers the same
    penalties), and 1 if this rank trains it. After the all-reduce,
    a count other than 0 or the number of ranks means the ranks disagree on what they
    regularize (a parameter frozen on some ranks only); ``check`` raises then, on every
    rank at once, instead of letting the next collective hang.
    """

    def __init__(
        self,
        registered: list[torch.Tensor],
        here: dict[int, int],
        groups: Sequence[ShardedGroup],
        reduce_over: tuple[Any, ...],
        describe: Callable[[int], str],
        registered_index: list[int],
        width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slot = {id(x): i for i, x in enumerate(registered)}
        self.ranks = 1
        for mesh, dim in reduce_over:
            self.ranks *= mesh.size(dim)
        self.describe, self.registered_index = describe, registered_index
        self.width = stride = width + 1
        flags = torch.zeros(stride * len(registered), dtype=dtype)
        for x in registered:
            if id(x) in here:
                flags[stride * slot[id(x)] + width] = 1.0
        self.flags = flags.to(device)
        self.values = torch.tensor(
            [stride * i + k for i in range(len(registered)) for k in range(width)],
            device=device,
            dtype=torch.long,
        )
        self.slots: dict[int, torch.Tensor] = {}
        used: dict[int, int] = {}  # value slot -> the plan index of its tensor
        for g in groups:
            if g.reduce_over != reduce_over:
                continue
            positions = [stride * slot[id(x)] + k for x, k in zip(g.tensors, g.positions)]
            self.slots[id(g)] = torch.tensor(positions, device=device)
            used.update(zip(positions, g.indices))
        self.part_slots = torch.tensor(sorted(used), device=device, dtype=torch.long)
        self.part_indices = [used[p] for p in sorted(used)]

    def check(self, full: torch.Tensor) -> None:
        counts = full[self.width - 1 :: self.width]
        bad = (counts != 0) & (counts != self.ranks)
        if is_compiling() or counts.device.type != "cpu":
            # No host synchronisation on a GPU: the check runs on the device.
            torch._assert_async(
                ~bad.any(),
                "regcollect: the ranks regularize different sharded tensors (a parameter "
                "frozen on some ranks only?); every rank must train the same ones",
            )
            return
        if bool(bad.any()):
            found = bad.nonzero().flatten().tolist()
            listed = "; ".join(
                f"{self.describe(self.registered_index[i])} is trained on {int(counts[i])} of "
                f"{self.ranks} ranks"
                for i in found
            )
            raise RuntimeError(
                f"loss(): the ranks do not regularize the same sharded tensors: {listed}. "
                "A parameter frozen (requires_grad=False) on some ranks "
                "only, or a scope that differs between ranks, gives each rank a different "
                "penalty; freeze the same parameters and use the same scope on every rank."
            )


def layouts(
    tensors: list[torch.Tensor],
    groups: Sequence[ShardedGroup],
    registered: Sequence[Placed | None],
    terms: Sequence[int],
    describe: Callable[[int], str],
    dtype: torch.dtype,
) -> dict[tuple[Any, ...], Layout]:
    """One ``Layout`` per set of mesh dimensions that sharded tensors reduce over, from every
    tensor registered (``(tensor, placement)``; None: none now) and the number of elementwise
    terms of its penalty (``terms``)."""
    here = {id(x): i for i, x in enumerate(tensors)}
    by_key: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
    seen: set[int] = set()
    for i, placed in enumerate(registered):
        if placed is None or id(placed[0]) in seen:
            continue
        x, placement = placed
        seen.add(id(x))
        reduce_over = placement.reduce_over
        # Sharded and summable; replicated DTensors need no collective.
        if reduce_over and not placement.refused:
            listed, index = by_key.setdefault(reduce_over, ([], []))
            listed.append(x)
            index.append(i)
    return {
        key: Layout(
            listed,
            here,
            groups,
            key,
            describe,
            index,
            max(terms[i] for i in index),
            dtype,
            listed[0].device,
        )
        for key, (listed, index) in by_key.items()
    }


class GroupAxis:
    """A process group in the shape of one dimension of a device mesh (what the sharded-sum
    layouts read: ``size(dim)``, ``get_group(dim)``), equal for the same group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def size(self, dim: int = 0) -> int:
        return int(self.group.size())

    def get_group(self, dim: int = 0) -> Any:
        return self.group

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupAxis) and other.group is self.group

    def __hash__(self) -> int:
        return id(self.group)


def all_reduce(local: torch.Tensor, reduce_over: tuple[Any, ...]) -> torch.Tensor:
    """Sum ``local`` (detached) over the mesh dimensions the tensors are sharded over."""
    out = local.detach().clone()
    for mesh, dim in reduce_over:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return out
