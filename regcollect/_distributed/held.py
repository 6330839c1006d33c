"""Parameters an engine holds in parts across the ranks: DeepSpeed ZeRO-3's partitioned
parameters and FSDP1's flat parameters (``use_orig_params=False``), with the penalty in the loss.

Outside the forward pass a rank holds only its part of such a parameter (ZeRO-3: the
parameter's ``ds_tensor``; FSDP1: the flat parameter's local shard), and the engine reduces the
parameter's gradient across the ranks itself, from the whole gradient computed while the
parameter is gathered. L1/L2 penalties are sums over elements, so they are computed as an FSDP2
shard's are: each rank on its part, the value completed with one all-reduce
(``regcollect._sharding``). The gradient reaches the engine's reduction in two hops:

- each ``loss()`` evaluates the penalty on a fresh leaf over the rank's part (``Part``), whose
  gradient hook adds the gradient into the parameter's ``pending`` buffer (the size of the part);
- a gradient hook on the engine's parameter, which runs when its whole gradient arrives
  (gathered, before the engine reduces it), adds ``pending`` at the rank's place in it, times
  the number of ranks the engine averages the gradient over (the other ranks add nothing
  there), so that after the reduction each rank's part of the gradient is exactly that of one
  process.

No autograd edge goes from the penalty to the engine's parameter: an edge made while the
parameter is partitioned fixes the shape its gradient must have to the partition's, and an edge
holds the parameter's gradient back until the penalty's backward has run. So the penalty's
backward must run before the parameter's gradient is reduced: ``loss()`` after the forward pass,
as in ``loss = criterion(model(x), y) + rc.loss()``, makes the penalty's nodes the newest of the
graph, which autograd runs first. A gradient that arrives too late (``loss()`` before the forward
pass, a parameter the forward pass did not use) is an error at the end of that backward pass,
naming the parameter: never a gradient lost, or carried into the next step.

Engines are recognised by the attributes they put on parameters and by their classes' names,
so nothing is imported here.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from .._state import STASHED
from .._torch_compat import in_backward
from . import fsdp1 as _fsdp1
from .sharding import GroupAxis

__all__ = [
    "Held",
    "Part",
    "flat_shard",
    "holding_engine",
    "is_zero3_partition",
    "real_shape",
    "zero3_partition",
]

# The Held of an engine's parameter, kept on the parameter (which the hook closes over weakly).
_HELD = "_regcollect_held"


def is_zero3_partition(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``tensor`` across the ranks."""
    return hasattr(tensor, "ds_numel") and hasattr(tensor, "ds_status")


def holding_engine(
    module: torch.nn.Module | None, name: str, tensor: torch.Tensor | None
) -> str | None:
    """The engine that holds ``module``'s parameter ``name`` (now ``tensor``) in parts across
    the ranks, for messages; None when none does. ``tensor`` None inside FSDP1: gone into a
    flat parameter (``use_orig_params=False``)."""
    if tensor is None:
        inside = module is not None and _fsdp1.inside_fsdp1(module)
        return _FlatShard.engine if inside else None
    if is_zero3_partition(tensor):
        return _Zero3.engine
    return "FSDP1" if getattr(tensor, "_fsdp_flattened", False) else None


def real_shape(module: torch.nn.Module, name: str, param: torch.Tensor | None) -> torch.Size | None:
    """The shape of ``module``'s parameter ``name`` as the model defines it: ZeRO-3's
    ``ds_shape``, or the shape it had before FSDP1 flattened it (``param`` None: gone into a
    flat parameter); None for a missing parameter no flat parameter holds."""
    if param is not None and is_zero3_partition(param):
        return torch.Size(param.ds_shape)  # type: ignore[attr-defined]
    return _fsdp1.real_shape(module, name, param)


class Held:
    """One engine parameter held in parts: where this rank's part lies in the whole, the
    gradient its penalties have produced in the current backward pass, and the hooks that
    hand that gradient to the engine."""

    engine = ""

    def __init__(
        self, param: torch.Tensor, start: int, numel: int, factor: int, group: Any, name: str
    ) -> None:
        self._param = weakref.ref(param)
        # This rank's part is elements [start, start + numel) of the flattened whole.
        self.start, self.numel = start, numel
        # The engine averages the whole gradients of `factor` ranks; the group sums the values.
        self.factor = factor
        self.over: tuple[Any, ...] = ((GroupAxis(group), 0),) if factor > 1 else ()
        self.name = name  # for errors: "'0.weight'", "the FSDP1 flat parameter holding ..."
        self.pending: torch.Tensor | None = None
        self._hooked = False  # the hook on the parameter, registered once it trains

    def local(self) -> torch.Tensor:
        """This rank's part, detached and flat (``numel`` elements)."""
        raise NotImplementedError

    @property
    def requires_grad(self) -> bool:
        param = self._param()
        return param is not None and param.requires_grad

    def _hook(self) -> None:
        param = self._param()
        if not self._hooked and param is not None:
            param.register_hook(self._deliver)
            self._hooked = True

    def _stash(self, start: int, stop: int, grad: torch.Tensor) -> None:
        if self.pending is None:
            self.pending = torch.zeros(self.numel, dtype=grad.dtype, device=grad.device)
            if not STASHED:  # the first in this backward pass: one check at its end
                torch.autograd.Variable._execution_engine.queue_callback(_check)
            STASHED.append(self)
        self.pending[start:stop] += grad

    def _deliver(self, grad: torch.Tensor) -> torch.Tensor | None:
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        out = grad.clone(memory_format=torch.contiguous_format)
        region = out.view(-1)[self.start : self.start + self.numel]
        region.add_(pending.to(device=out.device), alpha=self.factor)
        return out


def _check() -> None:
    """At the end of a backward pass: every stashed gradient must have been handed to its
    engine; any left is an error (all are cleared first, so nothing reaches the next step)."""
    late = [held for held in STASHED if held.pending is not None]
    _clear()
    if late:
        names = ", ".join(sorted({held.name for held in late}))
        raise RuntimeError(
            f"regcollect: the penalty's gradient for {names} arrived after {late[0].engine} "
            "had reduced the parameter's gradient, so it was not applied. With the parameter "
            "held in parts across the ranks, compute rc.loss() after the model's forward pass "
            "(loss = criterion(model(x), y) + rc.loss()), and regularize only parameters the "
            "forward pass uses."
        )


def _clear() -> None:
    for held in STASHED:
        held.pending = None
    STASHED.clear()


class Part:
    """One regularized tensor in a ``Held``: elements ``[start, stop)`` of the rank's part.
    ``current()`` gives them, as a fresh leaf whose gradient goes to the engine's parameter."""

    def __init__(self, held: Held, start: int, stop: int) -> None:
        self.held, self.start, self.stop = held, start, stop

    def current(self) -> torch.Tensor:
        x = self.held.local()[self.start : self.stop]
        if STASHED and not in_backward():
            # Outside a backward pass, gradients still stashed are from one that failed before
            # its end (its check never ran): dropped, not added to this step's.
            _clear()
        if torch.is_grad_enabled() and self.held.requires_grad:
            self.held._hook()
            x.requires_grad_()
            x.register_hook(partial(self.held._stash, self.start, self.stop))
        return x


class _Zero3(Held):
    engine = "DeepSpeed ZeRO-3"

    def local(self) -> torch.Tensor:
        param = self._param()
        assert param is not None
        return param.ds_tensor.detach().view(-1)[: self.numel]  # type: ignore[attr-defined]


class _FlatShard(Held):
    engine = "FSDP1 (use_orig_params=False)"

    def local(self) -> torch.Tensor:
        flat = self._param()
        assert flat is not None
        # FSDP1 keeps the shard as _local_shard from its first forward pass on; before, the
        # flat parameter holds it (FSDP1 shards as it wraps).
        shard = getattr(flat, "_local_shard", flat)
        return shard.detach().view(-1)[: self.numel]


def zero3_partition(param: torch.Tensor, entry: Any) -> Part:
    """The ``Part`` of a parameter ZeRO-3 partitions (``entry``'s): all of this rank's
    partition. The entry is named (for errors) only when the parameter is first seen."""
    held = getattr(param, _HELD, None)
    if held is None:
        group = param.ds_process_group  # type: ignore[attr-defined]
        size = param.ds_tensor.numel()  # type: ignore[attr-defined]
        start = dist.get_rank(group) * size
        numel = max(0, min(size, param.ds_numel - start))  # type: ignore[attr-defined]
        name = repr(entry.base_name()[0])
        held = _Zero3(param, start, numel, dist.get_world_size(group), group, name)
        setattr(param, _HELD, held)
    return Part(held, 0, held.numel)


def flat_shard(handle: Any, index: int, entry: Any) -> Part:
    """The ``Part`` of the ``index``-th original parameter of an FSDP1 handle's flat parameter
    (``use_orig_params=False``, ``entry``'s): the elements of it in this rank's shard, maybe
    none. The entry is named (for errors) only when the flat parameter is first seen."""
    flat = handle.flat_param
    held = getattr(flat, _HELD, None)
    if held is None:
        sharded = handle.uses_sharded_strategy
        size = flat._sharded_size.numel()
        numel = size - (flat._shard_numel_padded if sharded else 0)
        start = handle.rank * size if sharded else 0
        factor = handle.world_size if sharded else 1
        what = f"the FSDP1 flat parameter holding {entry.base_name()[0]!r}"
        held = _FlatShard(flat, start, numel, factor, handle.process_group, what)
        setattr(flat, _HELD, held)
    info = flat._shard_param_infos[index]
    if not info.in_shard:
        return Part(held, 0, 0)
    return Part(held, info.offset_in_shard, info.offset_in_shard + info.numel_in_shard)
