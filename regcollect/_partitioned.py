"""Parameters an engine partitions in place (FSDP1, DeepSpeed ZeRO-3): what that does to the
parameters a collection regularizes.

- ``use_orig_params=True``: each original parameter stays the same object, but outside the
  forward pass its data is a flat 1-D view of the part of it in this rank's shard (empty on the
  ranks holding none of it). Its L1/L2 penalties are sums over elements, so each rank computes
  them on its part and ``loss()`` completes the value with the all-reduce FSDP2's sharded
  tensors use (``regcollect._sharding``): the tensor is stamped with the FSDP process group
  while its flat parameter is sharded. Its gradient is already right (each rank's part).
  Penalties that need the whole tensor (orthogonal, custom, L2-SP, group lasso) are refused
  there, clearly, rather than computed on a shard.
- ``use_orig_params=False``: the original parameters are gone from their modules (FSDP1 keeps
  one flat parameter): nothing is left to regularize, which is refused with the way out.

- DeepSpeed ZeRO-3 partitions every parameter across the ranks (``ds_numel`` elements, none
  of them here outside the forward pass): its penalties cannot be computed on what a rank
  holds, which is refused, naming the parameter and the stages that work (ZeRO-1/2 keep whole
  parameters, and the penalty in the loss is exact there).

Engines are recognised by their classes' names and packages and by the attributes they put on
parameters, so nothing is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._entries import WEIGHT, Entry
from ._fsdp1 import inside_fsdp1, owner
from ._sharding import SHARD_OVER

__all__ = ["GroupAxis", "is_zero3_partition", "prepare", "zero3_refusal"]


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


def is_zero3_partition(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``tensor`` across the ranks."""
    return hasattr(tensor, "ds_numel") and hasattr(tensor, "ds_status")


def zero3_refusal(name: str, tensor: torch.Tensor) -> ValueError:
    """The error for a parameter ZeRO-3 partitions, naming it and the stages that work."""
    return ValueError(
        f"{name!r}: DeepSpeed ZeRO stage 3 partitions this parameter across the ranks "
        f"(shape {tuple(getattr(tensor, 'ds_shape', ()))}, here {tuple(tensor.shape)}); "
        "regcollect cannot compute its penalty from a partition. Use ZeRO stage 1 or 2, "
        "where the penalty in the loss is exact, or fully_shard (FSDP2)."
    )


def prepare(entries: Sequence[Entry], tensors: Sequence[torch.Tensor | None]) -> None:
    """Before a plan is built: stamp the FSDP1 shards among ``tensors`` with the group their
    partial sums reduce over (or nothing while unsharded), and refuse weight entries whose
    parameter FSDP1 flattened away.

    Raises:
        ValueError: A weight entry's parameter is gone into an FSDP1 flat parameter
            (``use_orig_params=False``), or DeepSpeed ZeRO-3 partitions it.
    """
    for entry, tensor in zip(entries, tensors):
        module = entry.module
        if tensor is None:
            if entry.kind == WEIGHT and module is not None and inside_fsdp1(module):
                raise ValueError(
                    f"{entry.base_name()[0]!r}: FSDP1 (FullyShardedDataParallel) "
                    "with use_orig_params=False replaced this parameter by a flat parameter, "
                    "so there is nothing left to regularize. Wrap with use_orig_params=True "
                    "(L1/L2 penalties are exact there), or use fully_shard (FSDP2)."
                )
            continue
        if is_zero3_partition(tensor):
            raise zero3_refusal(entry.base_name()[0], tensor)
        if not getattr(tensor, "_fsdp_flattened", False) or module is None:
            continue
        found = owner(module, entry.param or "")
        over: tuple[Any, ...] = ()
        if found is not None:
            handle = found[0]
            if handle.uses_sharded_strategy and handle.is_sharded(handle.flat_param):
                over = ((GroupAxis(handle.process_group), 0),)
        setattr(tensor, SHARD_OVER, over)
