"""Plans: which tensors ``loss()`` evaluates, cached between steps.

An eager plan is built once per scope and reused while nothing it depends on changes: the
collection's entries, the tracked module links (names and model subtrees), and for each tensor
its identity, ``requires_grad``, dtype and device (``module.to()``, FSDP2's parameter swaps
and freezing change those without any hook). Each step checks those in C-level calls only.
While ``torch.compile`` traces, the same choice is made without lock or cache (a *traced*
plan), so dynamo turns it into guards and a graph with no break.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._engine.plan import Plan, elementwise_terms
from .._penalties.base import Regularizer
from .._penalties.kernel import kernel_of
from ..schedules import Schedule
from .entries import ACTIVITY, TENSOR, Entry, current_tensors, tied_name
from .partitioned import prepare as prepare_partitioned

__all__ = [
    "View",
    "CachedPlan",
    "PlanCache",
    "applied",
    "choose",
    "ids_in",
    "scope_key",
    "traced_tensors",
    "with_records",
]

# What a plan depends on besides identity: module.to(dtype) and .cuda() change a parameter's
# dtype and device in place, keeping the same object, and structured pruning through .data its
# shape (the stacked path groups by shape). A comprehension, not map() over filter(): dynamo
# on torch 2.6 mis-traced that form (AttributeError on a tuple).
_meta = operator.attrgetter("requires_grad", "dtype", "device", "shape")


def _flags(tensors: list[torch.Tensor | None]) -> list[tuple[Any, ...]]:
    """``(requires_grad, dtype, device, shape)`` of each tensor that exists (None skipped)."""
    return [_meta(t) for t in tensors if t is not None]


def applied(entries: Sequence[Entry]) -> list[Regularizer]:
    """The regularizers ``loss()`` evaluates for ``entries`` (Keras's kernel layout where an
    orthogonal mode names it, an L2-SP bound to its reference: ``Regularizer._bind``)."""
    return [kernel_of(e.regularizer).bind(e.regularizer, e.module, e.param) for e in entries]


def choose(candidates: Sequence[Entry], tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """The positions of the entries whose tensor exists and trains (bare tensors: exists), in
    registration order, each tensor once.

    A parameter reached through two entries (tied after registration) counts once when they
    agree on its regularizer.

    Raises:
        ValueError: Two entries reach one tensor with different regularizers.
    """
    chosen: dict[int, tuple[int, torch.Tensor]] = {}
    for i, t in enumerate(tensors):
        # A bare tensor given to compat.v1.apply_regularization counts trained or not, as in
        # TF1's collection; a frozen parameter does not.
        if t is not None and (t.requires_grad or candidates[i].kind == TENSOR):
            earlier = chosen.get(id(t))
            if earlier is not None:
                first, second = candidates[earlier[0]], candidates[i]
                if first.regularizer != second.regularizer:
                    raise ValueError(
                        tied_name(
                            (first.base_name()[0], second.base_name()[0]),
                            (first.regularizer, second.regularizer),
                        )
                    )
            chosen[id(t)] = (i, t)
    picked = sorted(chosen.values(), key=operator.itemgetter(0))
    if any(t.is_meta for _, t in picked) and not all(t.is_meta for _, t in picked):
        # A meta-device copy (a shape-only model) beside real ones: its values do not exist,
        # and it would put the total on "meta". Left out; the collection warns.
        picked = [(i, t) for i, t in picked if not t.is_meta]
    return [i for i, _ in picked]


@dataclass(kw_only=True)
class View:
    """What one evaluation of a scope reads: the plan of its weights, the plan's ``entries``
    (one per tensor it evaluates), every entry the scope covers (``in_scope``, activity
    entries included) and the activity entries among them (``activity``)."""

    plan: Plan
    entries: list[Entry]
    in_scope: list[Entry]
    activity: list[Entry]
    # One plan per tensor, for losses(): built on its first call, then kept with the plan.
    singles: list[Plan] | None = None
    # The schedules of the entries' coefficients (None: not collected, as while tracing).
    schedules: tuple[Schedule, ...] | None = None

    def steps(self) -> dict[int, int] | None:
        """``{id(schedule): step}`` now: the steps this evaluation's coefficients are at."""
        return None if self.schedules is None else {id(s): s.step for s in self.schedules}

    def each(self) -> list[torch.Tensor]:
        """Each tensor's penalty alone, differentiable (sharded ones completed, as in the
        plan)."""
        if self.singles is None:
            self.singles = self.plan.split()
        return [single().total for single in self.singles]


@dataclass(kw_only=True)
class CachedPlan(View):
    """A view and what it was built from, checked at every call (``valid``)."""

    version: tuple[Any, ...]
    roots: tuple[weakref.ref[torch.nn.Module], ...]
    locators: list[tuple[Any, str | None]]
    tensors: list[torch.Tensor | None]
    flags: list[tuple[Any, ...]]
    # id(entry) -> model number, for the several-models warning of unscoped calls, and the
    # models the plan's weight entries belong to.
    models: dict[int, int] = field(default_factory=dict)
    weight_models: frozenset[int] = frozenset()
    in_scope_ids: frozenset[int] = frozenset()
    # Entries on meta tensors left out because real tensors are in the plan too.
    meta: list[Entry] = field(default_factory=list)
    # Engines' parameters holding parameters gone from their modules (FSDP1 flat parameters),
    # and whether each trained: freezing one changes no module attribute the other checks see.
    flat: list[torch.Tensor] = field(default_factory=list)
    flat_trains: list[bool] = field(default_factory=list)

    def valid(self, version: tuple[Any, ...], roots: Sequence[torch.nn.Module]) -> bool:
        if self.version != version or len(self.roots) != len(roots):
            return False
        if not all(r() is m for r, m in zip(self.roots, roots)):
            return False
        # The hot path: one identity and flags check per tensor, no names.
        tensors = current_tensors(self.locators)
        if self.flat and [t.requires_grad for t in self.flat] != self.flat_trains:
            return False
        return all(map(operator.is_, tensors, self.tensors)) and self.flags == _flags(tensors)


class PlanCache:
    """Per scope, the plans for the last two sets of tensors (FSDP2 swaps a root module's
    parameters between sharded and unsharded objects every step); at most ``size`` scopes."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._plans: dict[Any, list[CachedPlan]] = {}

    def get(
        self,
        key: Any,
        version: tuple[Any, ...],
        roots: Sequence[torch.nn.Module],
        build: Callable[[], tuple[list[Entry], list[Entry]]],
        describe: Callable[[list[Entry]], Callable[[int], str]],
        models: Callable[[list[Entry]], dict[int, int]] | None = None,
        no_grad: Callable[[], set[int]] | None = None,
    ) -> CachedPlan:
        """The valid cached plan for ``key``, or a new one from ``build() -> (in_scope,
        weight candidates)``."""
        recent = self._plans.get(key, [])
        for cached in recent:
            if cached.valid(version, roots):
                if cached is not recent[0]:
                    self._plans[key] = [cached, recent[0]]
                return cached
        in_scope, candidates = build()
        locators = [e.locator for e in candidates]
        tensors = current_tensors(locators)
        placed, flat = prepare_partitioned(candidates, tensors)
        evaluated = [p[0] if p is not None else None for p in placed]
        positions = choose(candidates, evaluated)
        entries = [candidates[i] for i in positions]
        chosen = [p for i in positions if (p := placed[i]) is not None]
        activity = [e for e in in_scope if e.kind == ACTIVITY]
        model_of = models([*entries, *activity]) if models is not None else {}
        cached = CachedPlan(
            version=version,
            roots=tuple(weakref.ref(m) for m in roots),
            locators=locators,
            tensors=tensors,
            flags=_flags(tensors),
            plan=Plan(
                [t for t, _ in chosen],
                applied(entries),
                describe(entries),
                placements=[p for _, p in chosen],
                # Every rank lays out the same sharded tensors, trained here or not.
                registered=placed,
                describe_registered=describe(candidates),
                registered_terms=[elementwise_terms(e.regularizer) for e in candidates],
                no_grad=no_grad() if no_grad is not None else frozenset(),
            ),
            entries=entries,
            in_scope=in_scope,
            activity=activity,
            models=model_of,
            weight_models=frozenset(model_of[id(e)] for e in entries if id(e) in model_of),
            in_scope_ids=frozenset(map(id, in_scope)),
            meta=_meta_only(candidates, tensors, entries),
            schedules=_schedules([*entries, *activity]),
            flat=flat,
            flat_trains=[t.requires_grad for t in flat],
        )
        if key not in self._plans and len(self._plans) >= self.size:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = [cached, *recent[:1]]
        return cached


def _schedules(entries: Sequence[Entry]) -> tuple[Schedule, ...]:
    """The distinct schedules among the entries' coefficients, found as the registry finds
    those it follows (``kernel_of(regularizer).schedules``)."""
    found: dict[int, Schedule] = {}
    for entry in entries:
        reg = entry.regularizer
        found.update({id(s): s for s in kernel_of(reg).schedules(reg)})
    return tuple(found.values())


def values_each(
    view: View, records: list[tuple[Entry, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, list[int]]]]:
    """``losses()``'s values: each entry's in registration order (a weight's alone, an
    activity entry's of the last forward pass), and the parts the read-back keeps."""
    values = view.each()
    parts = [(v.detach().reshape(1), [i]) for i, v in enumerate(values)]
    by_entry = dict(records)
    position = {id(e): i for i, e in enumerate(view.entries)}
    out = [
        values[position[id(e)]] if id(e) in position else by_entry[e]
        for e in view.in_scope
        if id(e) in position or e in by_entry
    ]
    return out, parts


def _meta_only(
    candidates: Sequence[Entry], tensors: Sequence[torch.Tensor | None], kept: Sequence[Entry]
) -> list[Entry]:
    """The entries on meta tensors left out because real tensors are in the plan too."""
    ids = set(map(id, kept))
    return [
        e
        for e, t in zip(candidates, tensors)
        if t is not None and t.is_meta and t.requires_grad and id(e) not in ids
    ]


def traced_tensors(candidates: Sequence[Entry]) -> list[torch.Tensor | None]:
    """``current_tensors`` spelled out for dynamo, which misreads the walrus cell of the
    one-line comprehension ("Read uninitialized cell")."""
    current: list[torch.Tensor | None] = []
    for ref, name in (e.locator for e in candidates):
        owner = ref()
        if name is not None and owner is not None:
            owner = owner._parameters.get(name)
        current.append(owner)
    return current


def mark_constant(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What ``torch.compiler.assume_constant_result`` does, without importing dynamo (and
    sympy) at import time: dynamo reads this attribute when it traces a call of ``fn``."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def scope_key(scope: str | tuple[torch.nn.Module, ...] | None) -> Any:
    """The cache and read-back key of a checked scope: a string, ids of modules, or None."""
    return tuple(map(id, scope)) if isinstance(scope, tuple) else scope


def ids_in(ids: frozenset[int]) -> Callable[[Entry], bool]:
    """Whether an entry is one of ``ids`` (a scope's, for the pending records)."""
    return lambda entry: id(entry) in ids


def with_records(
    total: torch.Tensor, values: list[torch.Tensor], has_weights: bool
) -> torch.Tensor:
    """A plan's total plus the activity penalties ``values`` (on their device and in their
    dtype when the plan has no weight)."""
    if not values:
        return total
    if not has_weights:
        total = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    return total + torch.stack([v.to(device=total.device) for v in values]).sum()
