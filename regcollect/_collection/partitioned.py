"""Parameters an engine partitions in place (FSDP1, DeepSpeed ZeRO-3): what a plan evaluates
for the parameters a collection regularizes.

- FSDP1, ``use_orig_params=True``: each original parameter stays the same object, but outside
  the forward pass its data is a flat 1-D view of the part of it in this rank's shard (empty
  on the ranks holding none of it). Its L1/L2 penalties are sums over elements, so each rank
  computes them on its part and ``loss()`` completes the value with the all-reduce FSDP2's
  sharded tensors use (``regcollect._sharding``): the tensor is stamped with the FSDP process
  group while its flat parameter is sharded. Its gradient is already right (each rank's part).
- DDP: each rank holds the whole parameter; under ``Join`` the penalty's gradient goes around
  DDP's average (``regcollect._routed``), so the parameter is marked with its DDP.
- FSDP1, ``use_orig_params=False``, and DeepSpeed ZeRO-3: the parameter is gone from its
  module into a flat parameter, or holds none of its elements outside the forward pass. The
  plan evaluates a stand-in for this rank's part of it instead (``regcollect._held``), whose
  gradient goes through the engine's own reduction.

Penalties that need the whole tensor (orthogonal, custom, L2-SP, group lasso) are refused on
such parameters, clearly, rather than computed on a part (``regcollect._engine``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import _naming
from .._distributed.ddp import ROUTE
from .._distributed.fsdp1 import inside_fsdp1, owner
from .._distributed.held import Part, flat_shard, is_zero3_partition, zero3_partition
from .._distributed.sharding import HELD_PART, SHARD_OVER, GroupAxis
from .entries import WEIGHT, Entry

__all__ = ["prepare"]


def prepare(
    entries: Sequence[Entry], tensors: Sequence[torch.Tensor | None]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """Before a plan is built: the tensors the plan evaluates for ``entries``, whose current
    tensors are ``tensors``, and the FSDP1 flat parameters holding those gone from their
    modules (whose ``requires_grad`` the plan depends on).

    FSDP1 shards (``use_orig_params=True``) are stamped with the group their partial sums
    reduce over (or nothing while unsharded). A parameter ZeRO-3 partitions, or FSDP1 flattened
    away (``use_orig_params=False``), is replaced by a stand-in for this rank's part of it.

    Raises:
        ValueError: A weight entry's parameter is gone from an FSDP1-wrapped module, and no
            flat parameter holds it.
    """
    out = list(tensors)
    flat: dict[int, torch.Tensor] = {}
    for i, (entry, tensor) in enumerate(zip(entries, tensors)):
        module = entry.module
        if tensor is None:
            if entry.kind != WEIGHT or module is None or not inside_fsdp1(module):
                continue
            found = owner(module, entry.param or "")
            if found is None:
                raise ValueError(
                    f"{entry.base_name()[0]!r}: FSDP1 (FullyShardedDataParallel) removed this "
                    "parameter from its module, and no FSDP1 flat parameter holds it."
                )
            flat[id(found[0].flat_param)] = found[0].flat_param
            out[i] = _stand_in(flat_shard(*found, entry))
            continue
        if is_zero3_partition(tensor):
            out[i] = _stand_in(zero3_partition(tensor, entry))
            continue
        if module is not None and entry.kind == WEIGHT:
            _mark_ddp(module, tensor)
        if not getattr(tensor, "_fsdp_flattened", False) or module is None:
            continue
        found = owner(module, entry.param or "")
        over: tuple[Any, ...] = ()
        if found is not None:
            handle = found[0]
            if handle.uses_sharded_strategy and handle.is_sharded(handle.flat_param):
                over = ((GroupAxis(handle.process_group), 0),)
        setattr(tensor, SHARD_OVER, over)
    return out, list(flat.values())


def _mark_ddp(module: torch.nn.Module, tensor: torch.Tensor) -> None:
    """A parameter DDP reduces carries a weak reference to that DDP (``regcollect._routed``:
    under ``Join`` its penalty's gradient goes around DDP's average)."""
    ddp = next(
        (m for m in _naming.ancestors(module) if isinstance(m, DistributedDataParallel)), None
    )
    if ddp is not None:
        setattr(tensor, ROUTE, weakref.ref(ddp))
    elif hasattr(tensor, ROUTE):
        delattr(tensor, ROUTE)


def _stand_in(part: Part) -> torch.Tensor:
    """A tensor with the dtype, device and size of ``part``, standing for it in a plan, which
    trains when the engine's parameter does (a frozen one is left out, as any frozen tensor,
    but keeps its place in the all-reduce layout every rank shares)."""
    x = part.held.local()[part.start : part.stop].requires_grad_(part.held.requires_grad)
    setattr(x, SHARD_OVER, part.held.over)
    setattr(x, HELD_PART, part)
    return x
