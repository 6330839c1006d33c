"""Sharded tensors (``DTensor``, as FSDP2 and tensor parallelism make them) in a plan.

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

``torch.distributed.tensor`` is never imported here before a DTensor exists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .._torch_compat import is_compiling

__all__ = [
    "PLAIN",
    "SHARD_OVER",
    "is_plain",
    "ContiguousGrad",
    "GroupAxis",
    "HELD_PART",
    "Layout",
    "ShardedGroup",
    "parts_message",
    "all_reduce",
    "is_dtensor",
    "layouts",
    "shard_reduction",
]


class ShardedGroup(Protocol):
    """What a layout reads of a plan's group."""

    p: int
    indices: list[int]
    tensors: list[torch.Tensor]
    reduce_over: tuple[Any, ...]


class Layout:
    """The all-reduce vector of one set of mesh dimensions, the same on every rank.

    Three slots per sharded tensor registered (trained on this rank or not), in registration
    order: its L1 and L2 partial values, and 1 if this rank trains it. After the all-reduce,
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
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slot = {id(x): i for i, x in enumerate(registered)}
        self.ranks = 1
        for mesh, dim in reduce_over:
            self.ranks *= mesh.size(dim)
        self.describe, self.registered_index = describe, registered_index
        flags = torch.zeros(3 * len(registered), dtype=dtype)
        for x in registered:
            if id(x) in here:
                flags[3 * slot[id(x)] + 2] = 1.0
        self.flags = flags.to(device)
        self.values = torch.tensor(
            [3 * i + k for i in range(len(registered)) for k in (0, 1)], device=device
        )
        self.slots: dict[int, torch.Tensor] = {}
        used: dict[int, int] = {}  # value slot -> the plan index of its tensor
        for g in groups:
            if g.reduce_over != reduce_over:
                continue
            offset = 0 if g.p == 1 else 1
            positions = [3 * slot[id(x)] + offset for x in g.tensors]
            self.slots[id(g)] = torch.tensor(positions, device=device)
            used.update(zip(positions, g.indices))
        self.part_slots = torch.tensor(sorted(used), device=device, dtype=torch.long)
        self.part_indices = [used[p] for p in sorted(used)]

    def check(self, full: torch.Tensor) -> None:
        counts = full[2::3]
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
    registered: Sequence[torch.Tensor | None],
    describe: Callable[[int], str],
    dtype: torch.dtype,
) -> dict[tuple[Any, ...], Layout]:
    """One ``Layout`` per set of mesh dimensions that sharded tensors reduce over."""
    here = {id(x): i for i, x in enumerate(tensors)}
    by_key: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
    seen: set[int] = set()
    for i, x in enumerate(registered):
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        reduce_over = shard_reduction(x)
        if reduce_over:  # sharded and summable; replicated DTensors need no collective
            listed, index = by_key.setdefault(reduce_over, ([], []))
            listed.append(x)
            index.append(i)
    return {
        key: Layout(listed, here, groups, key, describe, index, dtype, listed[0].device)
        for key, (listed, index) in by_key.items()
    }


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    A gathered tensor's gradient goes back to its shards through DTensor's redistribution;
    a regularizer whose gradient is a broadcast view (``(w.sum(1) ** 2).sum()`` gives an
    expanded, stride-0 tensor) reached FSDP2 as an unsharded gradient on torch 2.11.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


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


# Tensors that are not subclasses: their values are all here, and they can be stacked.
PLAIN = (torch.Tensor, torch.nn.Parameter)


# A plain tensor that holds one rank's part of a parameter (an FSDP1 shard view) carries the
# ((group, 0),) its partial sums are reduced over in this attribute (regcollect._partitioned).
SHARD_OVER = "_regcollect_shard_over"
# A tensor that stands in a plan for one rank's part of a parameter an engine holds in parts
# (ZeRO-3, FSDP1 with use_orig_params=False) carries its ``regcollect._held.Part`` here: the
# plan takes the part's values at every call (``current()``), as it takes a DTensor's local
# shard, and never the stand-in's own.
HELD_PART = "_regcollect_held_part"


def parts_message(regularizer: object, engine: str = "FSDP1") -> str:
    """Why ``regularizer`` cannot apply to a parameter ``engine`` holds in parts across the
    ranks (an FSDP1 shard, a ZeRO-3 partition)."""
    return (
        f"{engine} holds this parameter in parts across the ranks, and {regularizer!r} needs the "
        "whole tensor. Use fully_shard (FSDP2), where it is gathered, or L1/L2 penalties, which "
        f"are exact under {engine}"
    )


def is_plain(x: torch.Tensor) -> bool:
    """Whether ``x`` holds all its values as an ordinary tensor does: a ``Tensor``, a
    ``Parameter``, or a subclass of ``Parameter`` that only tags it (no ``__torch_dispatch__``
    or ``__torch_function__`` of its own, unlike DTensor and other wrapper subclasses), and
    not one rank's part of a parameter (``SHARD_OVER``, ``HELD_PART``)."""
    if getattr(x, SHARD_OVER, None) or hasattr(x, HELD_PART):
        return False
    cls = type(x)
    return cls in PLAIN or (
        issubclass(cls, torch.nn.Parameter)
        and cls.__torch_dispatch__ is torch.nn.Parameter.__torch_dispatch__
        and cls.__torch_function__ is torch.nn.Parameter.__torch_function__
    )


def is_dtensor(x: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported; never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def shard_reduction(x: torch.Tensor) -> tuple[Any, ...] | None:
    """How an elementwise-sum penalty of ``x`` is completed from local values.

    ``()`` for plain tensors and replicated DTensors (the local value is the full one);
    ``((mesh, dim), ...)`` for the mesh dimensions a DTensor is sharded over (an FSDP1 shard:
    its process group, ``SHARD_OVER``); None when the
    local values cannot be summed (a ``Partial`` placement, another tensor subclass), which
    sends the tensor down the per-tensor path.
    """
    over = getattr(x, SHARD_OVER, None)
    if over is not None:
        return tuple(over)
    if is_plain(x):
        return ()
    if not is_dtensor(x):
        return None
    from torch.distributed.tensor import Replicate, Shard

    reduce_over = []
    for dim, placement in enumerate(x.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            reduce_over.append((x.device_mesh, dim))  # type: ignore[attr-defined]
        elif not isinstance(placement, Replicate):
            return None
    return tuple(reduce_over)


def all_reduce(local: torch.Tensor, reduce_over: tuple[Any, ...]) -> torch.Tensor:
    """Sum ``local`` (detached) over the mesh dimensions the tensors are sharded over."""
    out = local.detach().clone()
    for mesh, dim in reduce_over:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return out
