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

The engines' adapters (``zero3``, ``fsdp1``) say where a rank's part lies; nothing here
names an engine.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch

from .._state import STASHED
from .._torch_compat import in_backward
from .placement import Placed, Placement
from .sharding import GroupAxis

__all__ = ["HELD", "Held", "Part"]

# The Held of an engine's parameter, kept on the parameter (which the hook closes over weakly).
HELD = "_regcollect_held"


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

    def placed(self) -> Placed:
        """A stand-in for this part in a plan, with the dtype, device and size of the part,
        which trains when the engine's parameter does (a frozen one is left out, as any
        frozen tensor, but keeps its place in the all-reduce layout every rank shares), and
        its placement: the plan takes the part's values at every call (``current()``), never
        the stand-in's own."""
        x = self.held.local()[self.start : self.stop].requires_grad_(self.held.requires_grad)
        placement = Placement(
            "held",
            self.held.engine,
            local=lambda _: self.current(),
            needs_local=True,
            reduce_over=self.held.over,
            whole=None,
            holder=self.held._param(),
        )
        return x, placement
