"""Coefficient schedules following the optimizer steps.

The rule: a schedule advances once per real update of the parameters it regularizes. A real
update is an outermost ``step()``: a step that another optimizer's step runs (a wrapper such as
ZeroRedundancyOptimizer, Lookahead or SAM stepping the optimizer it holds, a container stepping
several) is part of that one, whatever attribute holds it; nesting is seen through the step
hooks themselves (a step that starts while another is running in the same thread). A schedule
that several optimizers drive (a GAN's G and D, a Muon + AdamW split) advances once per round
of their steps: an optimizer's update advances it unless another live optimizer advanced it
since this one's last update. With G and D stepping alternately that is once per training step;
with five critic steps per generator step, once per critic step (the most-stepped optimizer's
count).

Its state goes with the optimizers' state: after each update, every optimizer that stepped
keeps the steps of the schedules it drives in its first parameter group, under
``"regcollect_schedules"`` (plain data: ``optimizer.state_dict()`` saves it, ``torch.load``
with ``weights_only=True`` reads it, and ``load_state_dict`` brings it back, as it does
``initial_lr`` for a learning-rate scheduler). A load into an optimizer regcollect knows
restores the schedules at once (a load post-hook); ``rc.schedules.resume(optimizer)`` makes an
optimizer known (the Trainer and Lightning integrations do it for theirs). An optimizer first
seen at its step restores them there, with a warning, since that step's loss was computed
before.

The hooks are the two process-wide optimizer-step hooks (``regcollect._state``), installed
with the first schedule in use.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from .._checks import warn_user
from .._state import FOLLOWING, OPTIMIZER_STEP, OPTIMIZER_STEP_PRE
from .._torch_compat import calls_under_way
from ..schedules import Schedule
from .wrappers import groups_key, skip_flag

__all__ = ["STATE_KEY", "changed", "follow", "resume"]

# FOLLOWING.users: the schedules in use, each with what it regularizes, weakly held
# (entry-like objects whose ``tensors()`` gives the tensors an optimizer must update for the
# schedule to advance, and ``name`` names it); FOLLOWING.driven: per optimizer, (cache key,
# schedules it drives); FOLLOWING.steps: per thread, the steps running now. Each schedule keeps
# its own rounds (_Round: the optimizer that advanced it last, the step each driving
# optimizer left it at); an optimizer whose loads restore schedules has _after_load among its
# load post-hooks.

STATE_KEY = "regcollect_schedules"


def follow(schedule: Schedule, user: Any) -> None:
    """Record that ``user`` (an entry; ``user.tensors()`` lists the tensors it regularizes)
    uses ``schedule``: the optimizers updating those tensors advance it."""
    FOLLOWING.users.setdefault(schedule, weakref.WeakSet()).add(user)
    FOLLOWING.version += 1
    OPTIMIZER_STEP_PRE.add(_before_step)
    OPTIMIZER_STEP.add(_after_step)


def release() -> None:
    """Nothing is regularized any more: the schedules' clock leaves torch's step hooks."""
    OPTIMIZER_STEP_PRE.discard(_before_step)
    OPTIMIZER_STEP.discard(_after_step)


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


def _key(schedule: Schedule) -> str | None:
    """A name for ``schedule`` that is the same in the next run of the same code: the first,
    in name order, of ``<entry name>:<coefficient>`` over the entries using it."""
    names = []
    for user in list(FOLLOWING.users.get(schedule, ())):
        regularizer = user.regularizer
        for attribute, value in vars(regularizer).items():
            if value is schedule:
                names.append(f"{user.name}:{attribute}")
    return min(names) if names else None


def _stack() -> list[tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]]:
    """The steps running in this thread: ``(optimizer, the steps run inside it)``."""
    local: threading.local = FOLLOWING.steps
    stack = getattr(local, "stack", None)
    if stack is None:
        stack = local.stack = []
    return stack


# The code of the wrapper torch.optim puts around every optimizer class's step(), which runs
# the step hooks: a frame of it is a step under way.
_STEP = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def _stepping() -> list[Any]:
    """The optimizers whose ``step()`` is under way in this thread (their wrapper frames)."""
    return [args[0] for args in calls_under_way(_STEP, "args") if args]


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stack = _stack()
    if stack:
        # A step that raised never ran its post-hooks: its frame is gone from this thread's
        # stack; so is everything it was running. Only steps still under way stay.
        live = _stepping()
        for i, (running, _) in enumerate(stack):
            if running is optimizer or not any(s is running for s in live):
                del stack[i:]
                break
    if stack:
        stack[0][1].append(optimizer)
    stack.append((optimizer, []))
    if FOLLOWING.users and not _known(optimizer):
        _meet(optimizer, at_step=True)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stack = _stack()
    for i, (running, inside) in enumerate(stack):
        if running is optimizer:
            del stack[i:]
            if i == 0:
                advance([optimizer, *inside])
            return


def advance(stepped: list[torch.optim.Optimizer]) -> None:
    """One real update, made by the optimizers ``stepped`` (the outermost first): advance
    once each schedule any of them drives, and keep the steps in their state.

    A step ``GradScaler`` skips inside a fused optimizer advances nothing (its flag is read
    on the host here, only when a schedule is driven).
    """
    if not FOLLOWING.users:
        return
    outer = stepped[0]  # the update is its: wrappers and containers step on its behalf
    driven: dict[Schedule, None] = {}
    for optimizer in stepped:
        driven.update(dict.fromkeys(_driven(optimizer)))
    if not driven:
        return
    for optimizer in stepped:
        found_inf = skip_flag(optimizer)
        if found_inf is not None and bool(found_inf.item()):
            return
    for schedule in driven:
        _round(schedule).update(outer, schedule)
    for optimizer in stepped:
        _save(optimizer)


class _Round:
    """Who advanced a schedule last, and the step each driving optimizer left it at."""

    def __init__(self) -> None:
        self.last: weakref.ref[torch.optim.Optimizer] | None = None
        self.seen: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = (
            weakref.WeakKeyDictionary()
        )

    def update(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        """``optimizer`` made a real update: advance ``schedule`` unless another live optimizer
        advanced it since this one's last update (then this one is in the same round)."""
        last = self.last() if self.last is not None else None
        if last is None or last is optimizer or self.seen.get(optimizer) == schedule.step:
            schedule.set_step(schedule.step + 1)
            self.last = weakref.ref(optimizer)
        self.seen[optimizer] = schedule.step

    def restored(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.last = weakref.ref(optimizer)
        self.seen[optimizer] = step


def _round(schedule: Schedule) -> _Round:
    """The schedule's own record of its rounds (state kept by the object it belongs to)."""
    found: _Round | None = schedule.__dict__.get("_round")
    if found is None:
        found = schedule.__dict__["_round"] = _Round()
    return found


def _save(optimizer: torch.optim.Optimizer) -> None:
    schedules = _driven(optimizer)
    if schedules and optimizer.param_groups:
        state = {key: s.step for s in schedules if (key := _key(s)) is not None}
        optimizer.param_groups[0][STATE_KEY] = state


def _saved(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    groups = optimizer.param_groups
    state = groups[0].get(STATE_KEY) if groups else None
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(k, str) and type(v) is int and v >= 0}


def _restore(optimizer: torch.optim.Optimizer) -> list[tuple[str, int, int]]:
    """Set the schedules ``optimizer`` drives to the steps its state keeps; return
    ``(key, step before, step now)`` of those that moved."""
    saved = _saved(optimizer)
    moved = []
    for schedule in _driven(optimizer) if saved else ():
        key = _key(schedule)
        if key is None or key not in saved:
            continue
        step = saved[key]
        _round(schedule).restored(optimizer, step)
        if step != schedule.step:
            moved.append((key, schedule.step, step))
            schedule.set_step(step)
    return moved


def _after_load(optimizer: torch.optim.Optimizer) -> None:
    _restore(optimizer)


def _known(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a load into ``optimizer`` restores the schedules (its load post-hooks say)."""
    hooks = getattr(optimizer, "_optimizer_load_state_dict_post_hooks", None)
    return hooks is None or any(h is _after_load for h in hooks.values())


def _meet(optimizer: torch.optim.Optimizer, at_step: bool) -> None:
    """Know ``optimizer`` from now on: a load restores its schedules; restore them now."""
    if not _known(optimizer):
        optimizer.register_load_state_dict_post_hook(_after_load)
    moved = _restore(optimizer)
    if moved and at_step:
        key, before, now = moved[0]
        warn_user(
            f"{type(optimizer).__name__}'s state holds the steps of regularization schedules "
            f"({key!r} at step {now}) that regcollect saw only at its first step(): the "
            f"penalty of this step used step {before}'s coefficient; the schedules resume from "
            "here. After loading an optimizer's state, call rc.schedules.resume(optimizer) "
            "before the first rc.loss() (RegularizedTrainer and the Lightning "
            "RegularizationLogger do)."
        )


def resume(optimizer: Any) -> None:
    """See ``regcollect.schedules.resume``."""
    from .wrappers import stepped

    inner = stepped(optimizer)
    OPTIMIZER_STEP_PRE.add(_before_step)
    OPTIMIZER_STEP.add(_after_step)
    _meet(inner, at_step=False)
