"""Which separate models a set of entries belongs to, and the warning when one ``loss()``
adds several of them up (a stale model from an earlier run, a copy, a GAN's two networks).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .. import _naming
from .._checks import warn_user
from .._optim import following as _following
from .._optim.groups import declared_l2
from .._state import COLLECTIONS, OPTIMIZER_STEP, OPTIMIZER_STEP_PRE
from .entries import Entry, current_tensors

__all__ = [
    "double_decay_check",
    "forgotten_loss_check",
    "install_group_hook",
    "install_step_hook",
    "model_groups",
    "several_models_message",
    "warn_meta",
    "warn_models",
]


def model_groups(entries: Iterable[Entry]) -> dict[int, int]:
    """``id(entry) -> model number``. Entries whose outermost models share a module are one
    model (a teacher sharing its student's embedding); entries with no module have none."""
    roots: dict[int, torch.nn.Module] = {}
    root_of: dict[int, int] = {}
    for e in entries:
        module = e.module
        if module is not None:
            root = _naming.path_to_root(module)[0]
            roots.setdefault(id(root), root)
            root_of[id(e)] = id(root)
    if len(roots) < 2:
        return dict.fromkeys(root_of, 0)
    group: dict[int, int] = {}
    owner: dict[int, int] = {}  # id(module) -> group of the first root holding it
    for n, (rid, root) in enumerate(roots.items()):
        group[rid] = n
        for m in root.modules():
            other = owner.setdefault(id(m), group[rid])
            if other != group[rid]:
                merged = group[rid]
                group = {k: other if v == merged else v for k, v in group.items()}
                owner = {k: other if v == merged else v for k, v in owner.items()}
    return {eid: group[rid] for eid, rid in root_of.items()}


def several_models_message(
    groups: Iterable[int],
    entries: Sequence[Entry],
    model_of: Mapping[int, int],
    names: Mapping[Entry, str],
) -> str:
    """The warning for an unscoped ``loss()`` over ``groups``: each model, a few of its
    entries, and how to choose."""
    described = []
    groups = sorted(groups)
    for group in groups[:3]:
        members = [e for e in entries if model_of.get(id(e)) == group]
        module = members[0].module if members else None
        if module is None:
            continue
        root = _naming.path_to_root(module)[0]
        shown = ", ".join(names.get(e, "?") for e in members[:3])
        more = ", ..." if len(members) > 3 else ""
        described.append(f"{type(root).__name__} {_naming.auto_name(root)!r} ({shown}{more})")
    if len(groups) > 3:
        described.append(f"and {len(groups) - 3} more")
    return (
        f"rc.loss() adds up the penalties of {len(groups)} separate models: "
        f"{'; '.join(described)}. If only one is being trained, pass it (rc.loss(model), or a "
        "list of models), give each model its own rc.Collection(), or delete the models you "
        "no longer use."
    )


def forgotten_loss_check(collections: Iterable[Any], optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer`` stepped: warn once per collection (of ``collections``) whose
    penalties never reach a loss."""
    for coll in list(collections):
        if coll._consumed or coll._warned_forgotten or not len(coll) or coll._attachments:
            continue  # (an attached optimizer applies the penalties itself)
        if len(coll._decay):
            continue  # (so do the parameter groups of param_groups())
        with coll._registry.lock:
            entries = coll._registry.entries()
            tensors = current_tensors([e.locator for e in entries])
            recorded = [e for e, _ in coll._registry.activity.read(None)]
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = [e for e, t in zip(entries, tensors) if t is not None and id(t) in ids]
        if not trained and not recorded:
            continue
        coll._warned_forgotten = True
        names = coll._registry._names()
        example = names.get((trained or recorded)[0], "?")
        warn_user(
            f"{_counted(len(entries), example)} registered, but "
            f"{type(optimizer).__name__}.step() ran before rc.loss() was ever called: the "
            "penalties are not part of training. Add rc.loss() to the loss you backpropagate "
            "(total_loss = loss + rc.loss())."
        )


def _counted(n: int, example: str) -> str:
    if n == 1:
        return f"1 regularization penalty ({example!r}) is"
    return f"{n} regularization penalties (e.g. {example!r}) are"


class _Names(Protocol):
    def _names(self) -> dict[Entry, str]: ...


def warn_models(
    weight_models: frozenset[int] | set[int],
    models: Mapping[int, int],
    in_scope: Sequence[Entry],
    records: Sequence[tuple[Entry, Any]],
    registry: _Names,
) -> bool:
    """Warn when an unscoped ``loss()`` sums separate models (those of its weight entries and
    of the activity penalties ``records`` it reads); return whether it warned."""
    groups = weight_models | {models.get(id(entry), -1) for entry, _ in records}
    groups = groups - {-1}
    if len(groups) <= 1:
        return False
    message = several_models_message(groups, in_scope, models, registry._names())
    warn_user(message)
    return True


def warn_meta(meta: Sequence[Entry], registry: _Names) -> bool:
    """Warn that entries on meta tensors were left out of ``loss()``; return True."""
    names = ", ".join(repr(registry._names().get(e, "?")) for e in meta[:3])
    warn_user(
        f"{len(meta)} entries ({names}) regularize tensors on the meta device (a model "
        "built for its shapes only) beside real ones; they are left out of loss(). Pass "
        "the real model (rc.loss(model)) to silence this."
    )
    return True


def install_step_hook() -> None:
    """The first entry anywhere installs the optimizer-step hook (the forgotten-loss
    warning)."""
    OPTIMIZER_STEP.add(_after_optimizer_step)


def release() -> None:
    """When no live collection holds an entry, the optimizer-step hooks (warnings, the
    parameter groups' schedules, the schedules' clock), which run at every optimizer step in
    the process, come out; registering again puts them back. The module-registration hook
    stays once in: the parent links it records while nothing is regularized name the layers of
    models built then (a block whose ModuleList is attached before its layers are made)."""
    if not any(len(coll) for coll in list(COLLECTIONS.live)):
        _take_out()


def _take_out() -> None:
    OPTIMIZER_STEP.discard(_after_optimizer_step)
    OPTIMIZER_STEP_PRE.discard(_before_optimizer_step)
    _following.release()


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Warn once per collection whose penalties never reach a loss, and once per optimizer
    that decays parameters whose penalty also reaches the loss; with no entry left anywhere
    (the models deleted), take the hooks out."""
    live = list(COLLECTIONS.live)
    if not any(len(coll) for coll in live):
        _take_out()
        return
    forgotten_loss_check(live, optimizer)
    double_decay_check(live, optimizer)


# The optimizers each collection has been checked against for double decay: once each.
_DECAY_CHECKED: weakref.WeakKeyDictionary[torch.optim.Optimizer, set[int]] = (
    weakref.WeakKeyDictionary()
)


def double_decay_check(collections: Iterable[Any], optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer`` stepped: warn (once per optimizer and collection) when it decays,
    through ``weight_decay``, parameters whose penalty the collection's ``loss()`` also adds.

    Checked once a collection's ``loss()`` has been called (its penalties reach the loss);
    parameters an attached optimizer holds are left out (that path warns for itself)."""
    try:
        checked = _DECAY_CHECKED.setdefault(optimizer, set())
    except TypeError:  # an optimizer that cannot be weakly referenced: checked every step
        checked = set()
    for coll in list(collections):
        if not coll._consumed or id(coll) in checked:
            continue
        checked.add(id(coll))
        decaying = [
            (p, float(group["weight_decay"]))
            for group in optimizer.param_groups
            if group.get("weight_decay")
            for p in group["params"]
        ]
        if not decaying:
            continue
        # Attached, or given to param_groups' groups (whose own warnings cover them).
        held = coll._held_by_optimizers() | coll._decay.recorded()
        with coll._registry.lock:
            entries = [e for e in coll._registry.entries() if e.param is not None]
            tensors = current_tensors([e.locator for e in entries])
        entry_of = {id(t): e for e, t in zip(entries, tensors) if t is not None}
        doubled = [
            (entry_of[id(p)], wd)
            for p, wd in decaying
            if id(p) in entry_of and id(p) not in held and p.requires_grad
        ]
        if doubled:
            _warn_double_decay(coll, optimizer, doubled)


def _warn_double_decay(
    coll: Any, optimizer: torch.optim.Optimizer, doubled: list[tuple[Entry, float]]
) -> None:
    names = coll._registry._names()
    shown = ", ".join(repr(names.get(e, "?")) for e, _ in doubled[:3])
    more = ", ..." if len(doubled) > 3 else ""
    n = len(doubled)
    warn_user(
        f"{n} parameter{'s' if n > 1 else ''} ({shown}{more}) penalised through rc.loss() "
        f"{'are' if n > 1 else 'is'} also decayed by weight_decay={doubled[0][1]} on "
        f"{type(optimizer).__name__}: regularized twice. Set weight_decay=0 for "
        f"{'them' if n > 1 else 'it'} (rc.l2(wd / 2) is SGD's weight_decay=wd; "
        "rc.attach_optimizer(opt, decoupled=True) with it is AdamW's)."
    )


def install_group_hook() -> None:
    """The first ``param_groups()`` call installs the step pre-hook that keeps the groups'
    ``weight_decay`` on their schedules and checks the groups each optimizer steps."""
    OPTIMIZER_STEP_PRE.add(_before_optimizer_step)


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for coll in list(COLLECTIONS.live):
        if not len(coll):
            continue
        registry = coll._registry
        coll._decay.before_step(
            optimizer,
            registry.version,
            lambda registry=registry: declared_l2(registry.ordered),
            coll._held_by_attachments,
            lambda ids, registry=registry: _names_of(registry, ids),
        )


def _names_of(registry: Any, ids: list[int]) -> str:
    """The entry names of the first few parameters ``ids`` (for a warning)."""
    names = registry._names()
    wanted = set(ids[:3])
    found = [names.get(e, "?") for e in registry.ordered if id(e.resolve()) in wanted]
    return ", ".join(repr(n) for n in found) + (", ..." if len(ids) > 3 else "")
