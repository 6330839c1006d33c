"""Coefficient schedules following the optimizer steps: which schedules an optimizer's step
drives (those of the tensors it updates), advanced once per real update by the one global
optimizer-step hook (``regcollect._state``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ._optimizers import groups_key, inner, skip_flag
from ._state import FOLLOWING, OPTIMIZER_STEP
from .schedules import Schedule

__all__ = ["advance", "changed", "follow"]

# FOLLOWING.users: the schedules in use, each with what it regularizes, weakly held
# (entry-like objects whose ``tensors()`` gives the tensors an optimizer must update for the
# schedule to advance); FOLLOWING.driven: per optimizer, (cache key, schedules it drives).


def follow(schedule: Schedule, user: Any) -> None:
    """Record that ``user`` (an entry; ``user.tensors()`` lists the tensors it regularizes)
    uses ``schedule``: optimizers updating those tensors advance it."""
    FOLLOWING.users.setdefault(schedule, weakref.WeakSet()).add(user)
    FOLLOWING.version += 1
    OPTIMIZER_STEP.add(_after_step)


def changed() -> None:
    """Something the schedules follow changed (an entry removed): recompute on next step."""
    FOLLOWING.version += 1


def _driven(optimizer: torch.optim.Optimizer) -> list[Schedule]:
    key = (FOLLOWING.version, groups_key(optimizer))
    cached = FOLLOWING.driven.get(optimizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    driven = [
        schedule
        for schedule, users in list(FOLLOWING.users.items())
        if any(id(t) in held for user in list(users) for t in user.tensors())
    ]
    FOLLOWING.driven[optimizer] = (key, driven)
    return driven


def advance(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer``: advance the schedules of the tensors it updates.

    Once per real update: a wrapper that steps an inner optimizer (Lookahead, SAM) leaves it
    to the inner one's step, and a step ``GradScaler`` skips inside a fused optimizer
    advances nothing (its flag is read on the host here, only when a schedule is driven).
    """
    if not FOLLOWING.users or inner(optimizer) is not None:
        return
    found_inf = skip_flag(optimizer)
    if found_inf is not None and bool(found_inf.item()):
        return
    for schedule in _driven(optimizer):
        schedule.set_step(schedule.step + 1)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    advance(optimizer)
