"""DTensors (FSDP2's ``fully_shard``, tensor parallelism, 2-D meshes): the adapter.

A DTensor's placements say where its values are. On each mesh dimension:

- ``Shard(d)`` (and ``_StridedShard``, a subclass, as FSDP2 over TP makes): the ranks of that
  dimension hold disjoint parts, so an elementwise sum of the local shard is completed by a sum
  over that dimension;
- ``Replicate()``: every rank of that dimension holds the same values: nothing to sum;
- ``Partial``: the local values are addends of the whole, so no elementwise penalty of the
  local values is one of the whole: the tensor is gathered (``full_tensor()``) instead.

The local shard is taken with ``to_local()`` at every call, so its gradient reaches the sharded
parameter; a gathered tensor's gradient goes back to the shards through DTensor's
redistribution (``ContiguousGrad``). ``torch.distributed.tensor`` is never imported here before
a DTensor exists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .placement import Adapter, Placed, Placement

__all__ = [
    "ContiguousGrad",
    "DTensorAdapter",
    "Shardable",
    "cut_dims",
    "is_dtensor",
    "steps_shards",
]


def is_dtensor(x: object) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported; never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


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


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local()  # type: ignore[attr-defined, no-any-return]


def _whole(x: torch.Tensor) -> torch.Tensor:
    return ContiguousGrad.apply(x.full_tensor())  # type: ignore[attr-defined, no-any-return]


class Shardable(Protocol):
    """What the rules read of a penalty's step term (``regcollect._penalties.base.Term``)."""

    def shardable(self, cut: frozenset[int], ndim: int) -> bool: ...


def cut_dims(x: torch.Tensor) -> frozenset[int] | None:
    """The tensor dimensions along which ``x``'s placements cut it into the ranks' pieces;
    None when the local values are no piece of it (a ``Partial`` placement, or one unknown
    here)."""
    strided = _strided_shard()
    cut = set()
    for placement in x.placements:  # type: ignore[attr-defined]
        if placement.is_replicate():
            continue
        if placement.is_shard() or (strided is not None and isinstance(placement, strided)):
            cut.add(placement.dim)
        else:
            return None
    return frozenset(cut)


def steps_shards(x: torch.Tensor, terms: Sequence[Shardable]) -> bool:
    """Whether the step math of every one of ``terms``, applied to ``x``'s local tensor on
    each rank, is the whole tensor's (``x`` a DTensor)."""
    cut = cut_dims(x)
    return cut is not None and all(term.shardable(cut, x.dim()) for term in terms)


def reduce_over(x: Any) -> tuple[Any, ...] | None:
    """The ``(mesh, dim)`` pairs an elementwise sum of ``x``'s local shard is completed over:
    the mesh dimensions that cut it (``Shard``, ``_StridedShard``); None when a placement
    makes local sums no part of the whole (``Partial``)."""
    strided = _strided_shard()
    out = []
    for dim, placement in enumerate(x.placements):
        if placement.is_shard() or (strided is not None and isinstance(placement, strided)):
            out.append((x.device_mesh, dim))
        elif not placement.is_replicate():
            return None
    return tuple(out)


def _strided_shard() -> type | None:
    """``_StridedShard`` (FSDP2's placement over a tensor-parallel shard of the same
    dimension), which is no ``Shard`` subclass in recent torch; None before it existed."""
    module = sys.modules.get("torch.distributed.tensor.placement_types")
    return getattr(module, "_StridedShard", None)


class DTensorAdapter(Adapter):
    engine = "DTensor"

    def place(
        self,
        tensor: torch.Tensor | None,
        module: torch.nn.Module | None,
        name: str | None,
        describe: Callable[[], str],
    ) -> Placed | None:
        if tensor is None or not is_dtensor(tensor):
            return None
        return tensor, Placement(
            "dtensor",
            self.engine,
            local=_local,
            needs_local=True,
            reduce_over=reduce_over(tensor),
            whole=_whole,
            steps=steps_shards,
        )

    def unstepped(
        self, tensor: torch.Tensor, regularizer: object, terms: Sequence[Any]
    ) -> str | None:
        from .dtensor_step import unsteppable  # the step's module imports this one

        return unsteppable(tensor, regularizer, terms) if is_dtensor(tensor) else None
