"""DDP under ``Join``: the penalty's gradient goes around DDP's gradient average.

DDP averages each parameter's gradient over the ranks. Every rank computes the same penalty
gradient, so the average of it is that gradient, as long as every rank takes part. Under
``torch.distributed.algorithms.Join`` with uneven inputs, a rank that has run out of inputs
takes part in the remaining steps' all-reduces with zeros (``_DDPJoinHook``), and the penalty's
gradient would come out scaled by the share of ranks still training, where
``SGD(weight_decay)`` applies the full decay on every rank.

So while a parameter's DDP runs under ``Join``, ``loss()`` evaluates its penalty on a leaf that
aliases the parameter (no copy): the leaf's gradient is kept aside during the backward pass and
added to the parameter's ``.grad`` at its end, after DDP has written the averaged gradients
(DDP finalizes in a callback it queues on the autograd engine during the backward pass; this
one queues itself once more from its own callback, so it runs after every callback queued
during the backward pass). Outside ``Join`` nothing changes: the average of equal gradients is
that gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import _naming
from .._torch_compat import in_backward
from .placement import Adapter, Placed, Placement, by_type

__all__ = ["DDPAdapter", "joined"]

# On a DDP module, during a backward pass: the (parameter, gradient) pairs kept aside.
_ASIDE = "_regcollect_aside"


def joined(ddp: Any) -> bool:
    """Whether ``ddp`` runs under ``Join`` (which sets the joinable's ``_join_config``)."""
    config = getattr(ddp, "_join_config", None)
    return bool(getattr(config, "enable", False))


def _routed(ref: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or, while the DDP module ``ref`` refers to runs under ``Join``, a leaf
    aliasing ``x`` whose gradient is added to ``x.grad`` after DDP's reduction."""
    ddp = ref()
    if ddp is None or not joined(ddp) or not x.requires_grad or not torch.is_grad_enabled():
        return x
    aside = ddp.__dict__.get(_ASIDE)
    if aside and not in_backward():
        aside.clear()  # kept from a backward pass that failed before its end: not this step's
    leaf = x.detach().requires_grad_(True)
    leaf.register_hook(partial(_set_aside, weakref.ref(ddp), weakref.ref(x)))
    return leaf


def _set_aside(ddp_ref: Any, param: Any, grad: torch.Tensor) -> None:
    ddp, p = ddp_ref(), param()
    if ddp is None or p is None:
        return
    aside = ddp.__dict__.setdefault(_ASIDE, [])
    if not aside:  # the first in this backward pass
        torch.autograd.Variable._execution_engine.queue_callback(partial(_after_callbacks, ddp_ref))
    aside.append((p, grad))


def _after_callbacks(ddp_ref: Any) -> None:
    # Queued during the backward pass like DDP's own finalizing callback, maybe before it:
    # queue again, to run after every callback queued until now.
    torch.autograd.Variable._execution_engine.queue_callback(partial(_add_aside, ddp_ref))


def _add_aside(ddp_ref: Any) -> None:
    ddp = ddp_ref()
    if ddp is None:
        return
    aside = list(ddp.__dict__.get(_ASIDE, ()))
    ddp.__dict__.get(_ASIDE, []).clear()
    with torch.no_grad():
        for p, grad in aside:
            if p.grad is None:
                p.grad = grad.detach().clone()
            else:
                p.grad.add_(grad.to(p.grad.dtype))


class DDPAdapter(Adapter):
    """A parameter of a module a DDP module wraps: all its values here, its penalty's gradient
    routed around DDP's average while that DDP runs under ``Join``."""

    engine = "DDP"

    def place(
        self,
        tensor: torch.Tensor | None,
        module: torch.nn.Module | None,
        name: str | None,
        describe: Callable[[], str],
    ) -> Placed | None:
        if tensor is None or module is None or name is None:
            return None
        default = by_type(tensor)
        if default.refused:
            return None
        ddp = next(
            (m for m in _naming.ancestors(module) if isinstance(m, DistributedDataParallel)), None
        )
        if ddp is None:
            return None
        route = partial(_routed, weakref.ref(ddp))
        return tensor, Placement(
            "ddp", self.engine, local=route, whole=route, plain=default.plain, needs_local=True
        )
