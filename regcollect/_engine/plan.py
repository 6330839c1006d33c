"""Computes many penalties at once.

A ``Plan`` is built once from ``(tensor, regularizer)`` pairs and evaluated every training
step. Regularizers whose parts are all p-norm powers (``Regularizer._terms``, ``Term.p``) are
split into their parts and grouped by ``(p, coefficient, device, dtype)``; each group is a single
autograd node
whose forward is one ``torch._foreach_norm`` and whose backward is one or two ``torch._foreach_*``
calls, accumulating in float32 at least. On the CPU, where ``_foreach_*`` kernels loop over
their tensors one by one, 16 or more small tensors of one shape are stacked instead, so that
each step is one kernel (``_StackedPenalty``). Other regularizers (orthogonal, custom)
are called on their tensor one by one. The per-call Python cost is proportional to the number
of groups, not the number of tensors, and nothing here reads a value back to the host.

Each tensor comes with its placement (``regcollect._distributed.placement``): the plan takes its
local values through it, completes elementwise sums of values spread over the ranks with one
all-reduce per set of axes (``regcollect._distributed.sharding``), gathers the whole tensor for
other penalties where the placement can, and refuses them where it cannot. The grouped kernels
are in ``regcollect._penalties.kernels``.

This module knows nothing of modules, names, collections or engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .._distributed.placement import Placed, Placement, parts_message
from .._distributed.seam import placement_of
from .._distributed.sharding import all_reduce, layouts
from .._penalties.base import Coefficient, Regularizer, Term, accumulation_dtype, scale
from .._penalties.kernel import kernel_of
from .._penalties.kernels import group_penalty, group_value

__all__ = ["Plan", "Result", "elementwise_terms", "group_penalty", "powers", "steppable"]


def steppable(x: torch.Tensor, reg: Regularizer) -> bool:
    """Whether an attached optimizer's step applies ``reg`` to ``x`` (and ``loss()`` then
    gives its value without a gradient): the one rule both sides follow, so that a penalty is
    counted exactly once. Where the placement has a rule of its own (a DTensor's, by its
    placements), that rule; else elementwise terms on tensors whose local values sum to the
    penalty; the other penalties with step math on plain tensors only."""
    terms = kernel_of(reg).terms(reg) if x.is_floating_point() else ()
    if not terms:
        return False
    placement = placement_of(x)
    if placement.steps is not None:
        return placement.steps(x, [term for term, _ in terms])
    if all(term.local for term, _ in terms):  # elementwise: each shard as it is
        return placement.elementwise
    return placement.plain


def elementwise_terms(reg: Regularizer) -> int:
    """How many elementwise-sum parts ``reg`` has (its slots in an all-reduce layout)."""
    terms = powers(reg)
    return len(terms) if terms else 0


def powers(reg: Regularizer) -> tuple[tuple[Term, Coefficient], ...] | None:
    """The penalty's parts when all are p-norm powers (the grouped kernels'), else None."""
    terms = kernel_of(reg).terms(reg)
    return terms if terms and all(term.p for term, _ in terms) else None


@dataclass
class Result:
    """One evaluation of a plan.

    ``total`` is differentiable. ``parts`` is a list of ``(values, indices)``: detached 1-D
    tensors of penalty values and, for each value, the index of the tensor it belongs to (a
    tensor with an L1L2 regularizer appears in two parts). Reading them costs one
    device-to-host copy per device, done only when someone asks (a summary).
    """

    total: torch.Tensor
    parts: list[tuple[torch.Tensor, list[int]]]


class Plan:
    """A reusable grouping of ``(tensor, regularizer)`` pairs; call it to get a ``Result``.

    Examples:
        >>> w = torch.ones(2, 2, requires_grad=True)
        >>> from regcollect.regularizers import L2, L1L2
        >>> plan = Plan([w, w[0]], [L2(0.5), L1L2(1.0, 0.0)])
        >>> plan().total.item()   # 0.5 * 4 + 1.0 * 2
        4.0
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        regularizers: Sequence[Regularizer],
        describe: Callable[[int], str] | None = None,
        registered: Sequence[Placed | None] | None = None,
        describe_registered: Callable[[int], str] | None = None,
        registered_terms: Sequence[int] | None = None,
        no_grad: set[int] | frozenset[int] = frozenset(),
        placements: Sequence[Placement] | None = None,
    ):
        if len(tensors) != len(regularizers):
            raise ValueError(
                f"tensors and regularizers must have the same length, "
                f"got {len(tensors)} and {len(regularizers)}"
            )
        self.tensors = list(tensors)
        self.regularizers = list(regularizers)
        self.no_grad = frozenset(no_grad)
        # Names the tensor in error messages; called only when a regularizer fails.
        self.describe = describe if describe is not None else (lambda i: f"tensor {i}")
        # Where each tensor's values are: plain tensors go straight to the kernels; the others
        # contribute their local values, taken through the placement at every call so that
        # gradients reach the parameter by the engine's route.
        self.placements = (
            list(placements) if placements is not None else list(map(placement_of, tensors))
        )
        # Per group key, (plan index, position of the key's term among the tensor's terms).
        groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        batched: dict[tuple[Any, ...], list[int]] = {}
        self._coefs: dict[Any, Coefficient] = {}  # a group key's coefficient part -> it
        self.fallback: list[int] = []
        self.fallback_detached: set[int] = set()
        for i, (x, reg, where) in enumerate(zip(self.tensors, self.regularizers, self.placements)):
            if where.refused:
                raise ValueError(f"{self.describe(i)}: {where.refused}")
            terms = powers(reg) if x.is_floating_point() else None
            if terms is None or not where.elementwise:
                self._place_other(i, x, reg, id(x) in no_grad, batched)
            else:
                for key, coef, position in _group_keys(x, where, terms, id(x) in no_grad):
                    groups.setdefault(key, []).append((i, position))
                    self._coefs[key[1]] = coef
        self.groups = self._make_groups(groups)
        self.batches = [(k[0], idx, k[-1]) for k, idx in batched.items()]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.dtype = torch.float32
        for x in self.tensors:
            self.dtype = torch.promote_types(self.dtype, accumulation_dtype(x.dtype))
        self.layouts = layouts(
            self.tensors,
            self.groups,
            list(zip(self.tensors, self.placements)) if registered is None else registered,
            list(map(elementwise_terms, self.regularizers))
            if registered_terms is None
            else registered_terms,
            describe_registered or self.describe,
            self.dtype,
        )

    def _place_other(
        self,
        i: int,
        x: torch.Tensor,
        reg: Regularizer,
        no_grad: bool,
        batched: dict[tuple[Any, ...], list[int]],
    ) -> None:
        """A penalty that is no sum of p-norm powers (or a tensor no all-reduce completes):
        evaluated many at once (its kernel's ``batch``) or called on its own tensor."""
        where = self.placements[i]
        if where.whole is None:
            raise ValueError(f"{self.describe(i)}: {parts_message(reg, where.engine)}")
        # Many at once: plain tensors only; sharded ones are gathered and called one by one.
        kernel = kernel_of(reg)
        key = kernel.batch_key(reg, x) if where.plain and x.is_floating_point() else None
        detached = no_grad and steppable(x, reg)
        if key is None:
            self.fallback.append(i)
            if detached:
                self.fallback_detached.add(i)
        else:
            batched.setdefault((kernel, key, x.device, x.dtype, detached), []).append(i)

    def _make_groups(self, groups: dict[tuple[Any, ...], list[tuple[int, int]]]) -> list[_Group]:
        """The grouped kernels' groups. Stacking pays for its extra node only with enough
        tensors of one shape; fewer go back to the group's foreach node, so the node count
        stays bounded."""
        merged: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for key, members in groups.items():
            if key[-1] is not None and len(members) < _STACK_MIN:
                key = (*key[:-1], None)
            merged.setdefault(key, []).extend(members)
        return [
            _Group(
                p,
                self._coefs[coef],
                [i for i, _ in members],
                [self.tensors[i] for i, _ in members],
                [self.placements[i].local for i, _ in members] if local else None,
                reduce_over,
                shape is not None,
                detached,
                [k for _, k in members],
            )
            for ((p, coef, _, _, local, reduce_over, detached, shape), members) in merged.items()
        ]

    def split(self) -> list[Plan]:
        """One plan per tensor, each computing its penalty alone (sharded tensors completed
        as in this plan), for per-tensor values that keep their gradient."""
        return [
            Plan(
                [x],
                [reg],
                partial(_first_as, self.describe, i),
                no_grad=self.no_grad & {id(x)},
                placements=[where],
            )
            for i, (x, reg, where) in enumerate(
                zip(self.tensors, self.regularizers, self.placements)
            )
        ]

    def __call__(self) -> Result:
        values: list[torch.Tensor] = []  # each part's total, added up at the end
        parts: list[tuple[torch.Tensor, list[int]]] = []
        pending = self._grouped(values, parts)
        self._completed(pending, values, parts)
        self._batched(values, parts)
        self._called(values, parts)
        total: torch.Tensor | None = None
        for value in values:
            total = _add(total, value, self.device, self.dtype)
        if total is None:
            total = torch.zeros((), dtype=self.dtype, device=self.device)
        return Result(total, parts)

    def _grouped(
        self, values: list[torch.Tensor], parts: list[tuple[torch.Tensor, list[int]]]
    ) -> dict[tuple[Any, ...], list[tuple[_Group, torch.Tensor, torch.Tensor]]]:
        """The grouped kernels: one node per group. Partial values of sharded tensors are
        returned, by what they are reduced over, for ``_completed``."""
        pending: dict[tuple[Any, ...], list[tuple[_Group, torch.Tensor, torch.Tensor]]] = {}
        for group in self.groups:
            tensors = group.tensors
            if group.local is not None:
                tensors = [local(x) for local, x in zip(group.local, tensors)]
            coef = scale(group.coef, tensors[0])  # a schedule: its current value, a tensor
            kernel = group_value if group.detached else group_penalty
            group_total, group_values = kernel(group.p, coef, tensors, group.stacked)
            if group.reduce_over:
                pending.setdefault(group.reduce_over, []).append((group, group_total, group_values))
            else:
                values.append(group_total)
                parts.append((group_values, group.indices))
        return pending

    def _completed(
        self,
        pending: dict[tuple[Any, ...], list[tuple[_Group, torch.Tensor, torch.Tensor]]],
        values: list[torch.Tensor],
        parts: list[tuple[torch.Tensor, list[int]]],
    ) -> None:
        """Partial values from every shard, in a layout every rank shares: one all-reduce for
        all sharded tensors alike, which also counts the ranks training each one."""
        for reduce_over, layout in self.layouts.items():
            local_parts = pending.get(reduce_over, [])
            local = layout.flags.clone()
            if local_parts:
                local.index_put_(
                    (torch.cat([layout.slots[id(g)] for g, _, _ in local_parts]),),
                    torch.cat([v.to(self.dtype) for _, _, v in local_parts]),
                    accumulate=True,
                )
            full = all_reduce(local, reduce_over)
            layout.check(full)
            value = full[layout.values].sum()
            if local_parts:
                local_total = _sum([t.to(self.dtype) for _, t, _ in local_parts])
                # The value is the full penalty, bit-identical on every rank; the gradient is
                # that of this rank's partial penalty, i.e. exactly this shard's part of it.
                value = value + (local_total - local_total.detach())
            values.append(value)
            if layout.part_indices:
                parts.append((full[layout.part_slots], layout.part_indices))

    def _batched(
        self, values: list[torch.Tensor], parts: list[tuple[torch.Tensor, list[int]]]
    ) -> None:
        """Penalties a kernel evaluates many at once (L2-SP, group lasso)."""
        for kernel, idx, detached in self.batches:
            try:
                with torch.no_grad() if detached else contextlib.nullcontext():
                    batch_total, batch_values = kernel.batch(
                        [self.placements[i].local(self.tensors[i]) for i in idx],
                        [self.regularizers[i] for i in idx],
                    )
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{self.describe(idx[0])}: {exc}") from exc
            parts.append((batch_values, idx))
            values.append(batch_total)

    def _called(
        self, values: list[torch.Tensor], parts: list[tuple[torch.Tensor, list[int]]]
    ) -> None:
        """The other penalties, called on their whole tensor (a sharded one gathered)."""
        for i in self.fallback:
            whole = self.placements[i].whole
            assert whole is not None  # refused when the plan was built
            x = whole(self.tensors[i])
            try:
                with torch.no_grad() if i in self.fallback_detached else contextlib.nullcontext():
                    value = self.regularizers[i](x)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{self.describe(i)}: {exc}") from exc
            parts.append((value.detach().reshape(1), [i]))
            values.append(value)


def _group_keys(
    x: torch.Tensor,
    where: Placement,
    terms: tuple[tuple[Term, Coefficient], ...],
    detached: bool,
) -> list[tuple[tuple[Any, ...], Coefficient, int]]:
    """The keys of the groups ``x``'s p-norm parts go into, each with its coefficient and the
    part's position among ``x``'s (its slot in an all-reduce layout).

    Zero terms are skipped, but a tensor whose terms are all zero (a lambda = 0 run of a
    sweep) keeps one, so that it stays in the graph with a zero gradient. Tensors whose
    local values are taken through their placement (a replicated DTensor has nothing to
    reduce but still needs to_local(); DDP's parameters route their gradient) do not share a
    group with those taken as they are: the placement's kind is part of the key. Tensors whose
    terms an optimizer applies (attach_optimizer, ``detached``): their value is computed
    without autograd, in groups of their own.
    """
    shape = _stack_shape(x, where, _VALUE_STACK_MAX_BYTES if detached else _STACK_MAX_BYTES)
    # The value of a DDP parameter an optimizer applies needs no route: no gradient.
    local = where.kind if where.needs_local and not (detached and where.plain) else None
    key = (x.device, x.dtype, local, where.reduce_over, detached, shape)
    kept = [(k, t) for k, t in enumerate(terms) if t[1]] or [(0, terms[0])]
    return [((term.p, _coef_key(coef), *key), coef, k) for k, (term, coef) in kept]


def _first_as(describe: Callable[[int], str], i: int, _: int) -> str:
    """``describe(i)`` for a one-tensor plan split from a plan, whose only tensor is 0."""
    return describe(i)


def _coef_key(coef: Coefficient) -> Any:
    """A coefficient as a group key: a number itself, a schedule by identity (dynamo before
    torch 2.7 cannot key a dict by an object while it traces)."""
    return coef if type(coef) in (int, float) else ("schedule", id(coef))


@dataclass
class _Group:
    p: int
    coef: Coefficient
    indices: list[int]
    tensors: list[torch.Tensor]
    # How each tensor's local values are taken (its placement's), or None: as they are.
    local: list[Callable[[torch.Tensor], torch.Tensor]] | None
    # () for tensors whose values are all here; else the (mesh, dim) pairs to sum over.
    reduce_over: tuple[Any, ...]
    # Small CPU tensors of one shape, computed from one stacked copy (_StackedPenalty, or
    # group_value for the detached ones).
    stacked: bool
    # Applied by an optimizer (attach_optimizer): the value only, no autograd node.
    detached: bool = False
    # Per tensor, the position of this group's term among the tensor's elementwise terms.
    positions: list[int] = field(default_factory=list)


# Stacking small CPU tensors: at most this many bytes each, at least this many of one shape.
# Measured (forward + backward into existing .grad, one thread): 100 tensors of 64 to 1024
# float32 elements take 0.74-0.80x the foreach node's time, 1000 of 64 elements 0.69x; at
# 2048-8192 elements the larger stacked copies meet the allocator's page faults and take
# 1.1-1.6x; groups of 4-8 tensors gain nothing (0.9-1.15x) over one extra node.
_STACK_MAX_BYTES = 4 * 1024
_STACK_MIN = 16
# The value alone (penalties an optimizer applies): no node, and the stacked copy is freed at
# once. Measured (one thread, 16 and 100 tensors, an optimizer step between calls): 0.3-0.7x
# the per-tensor _foreach_norm up to 4096 float32 elements, 1.0-1.8x at 16384.
_VALUE_STACK_MAX_BYTES = 16 * 1024


def _stack_shape(x: torch.Tensor, where: Placement, max_bytes: int) -> torch.Size | None:
    """``x``'s shape if it may be stacked with tensors of the same shape, else None."""
    if where.plain and x.device.type == "cpu" and x.numel() * x.element_size() <= max_bytes:
        return x.shape
    return None


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).sum()


def _add(
    total: torch.Tensor | None, value: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if value.device != device or value.dtype != dtype:
        value = value.to(device=device, dtype=dtype, non_blocking=True)
    return value if total is None else total + value
