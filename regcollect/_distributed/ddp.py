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
from functools import partial
from typing import Any

import torch

from .._torch_compat import in_backward

__all__ = ["ROUTE", "joined", "routed"]

# On a parameter a DDP module reduces: a weak reference to that module (set by
# regcollect._partitioned when a plan is built).
ROUTE = "_regcollect_ddp"
# On that DDP module, during a backward pass: the (parameter, gradient) pairs kept aside.
_ASIDE = "_regcollect_aside"


def joined(ddp: Any) -> bool:
    """Whether ``ddp`` runs under ``Join`` (which sets the joinable's ``_join_config``)."""
    config = getattr(ddp, "_join_config", None)
    return bool(getattr(config, "enable", False))


def routed(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or, for a parameter whose DDP runs under ``Join``, a leaf aliasing it
    whose gradient is added to ``x.grad`` after DDP's reduction."""
    ref = getattr(x, ROUTE, None)
    ddp = ref() if ref is not None else None
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
