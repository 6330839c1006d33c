"""``loss()`` while ``torch.compile`` traces: the same choice as the eager path, made without
lock, cache or warning, so that dynamo turns it into guards and a graph with no break.

``coll`` is a ``regcollect.Collection`` (typed loosely: this module sits below it).
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import ScopeArg, check_scope
from .._distributed.held import holding_engine
from .._engine.plan import Plan
from .._torch_compat import CONSTANT_FUNCTIONS_TAKE_OBJECTS
from .entries import ACTIVITY, WEIGHT
from .plans import applied, choose, mark_constant, scope_key, traced_tensors, with_records
from .readout import Last

__all__ = ["traced_loss"]


def traced_loss(coll: Any, scope: ScopeArg) -> torch.Tensor:
    """``loss()`` while torch.compile traces: no lock, no cache, no warning.

    Dynamo turns this into guards on the entries and the modules' parameters and a graph
    of the penalty math, so a compiled step has no graph break here. A ``scope`` is
    matched against the names once, when the step is traced (``_scope_positions``).
    """
    if _held_parameter(coll):
        # Completed across the ranks, its gradient handed to the engine: the eager path only
        # (outside the graph, loss() is not compiling, so it takes that path).
        return torch.compiler.disable(coll.loss)(scope)  # type: ignore[no-any-return]
    in_scope = list(coll._registry.ordered)
    checked = None if scope is None else check_scope(scope)  # the eager path's errors
    if checked is not None:
        found = _scope_positions(coll, scope)
        if isinstance(found, str):  # an invalid regular expression
            raise ValueError(found)
        in_scope = [in_scope[i] for i in found]
    candidates = [e for e in in_scope if e.kind != ACTIVITY]
    entries, tensors = choose(candidates, traced_tensors(candidates))
    held: set[int] = (
        coll._held_by_optimizers() if len(coll._attachments) > 0 or len(coll._decay) > 0 else set()
    )
    plan = Plan(tensors, applied(entries), no_grad=held)
    keep = None if scope is None else frozenset(map(id, in_scope))
    records = coll._registry.activity.read(keep)
    result = plan()
    coll._readout.store(
        scope_key(checked),
        Last(entries, result.parts, records, [e for e in in_scope if e.kind == ACTIVITY]),
    )
    coll._consumed = True
    return with_records(result.total, [v for _, v in records], len(entries) > 0)


def _positions(coll: Any, scope: Any) -> tuple[int, ...] | str:
    """Positions, among ``coll``'s entries, of those ``scope`` covers.

    While torch.compile traces, this runs once, outside the graph, and its result is a
    constant of the graph: names and regular expressions are Python work that dynamo would
    otherwise break the graph for. The entries themselves are guarded, so adding or removing
    one retraces; a name that changes later without that (a module renamed) is not seen.
    An invalid regular expression gives the error message, for the caller to raise: raised
    here, it would reach the user wrapped in a dynamo error.
    """
    try:
        keep = set(map(id, coll.entries(scope)))
    except ValueError as exc:
        return str(exc)
    return tuple(i for i, e in enumerate(coll._registry.ordered) if id(e) in keep)


def _held(coll: Any) -> bool:
    """Whether a parameter of ``coll``'s entries is held in parts across the ranks by FSDP1 or
    DeepSpeed ZeRO-3: only the eager path completes its penalty and hands its gradient to the
    engine (``regcollect._partitioned``), so ``loss()`` runs eagerly then, outside the graph.

    Like ``_positions``, this runs once, outside the graph, when torch.compile traces.
    """
    return any(
        holding_engine(entry.module, entry.param or "", entry.resolve()) is not None
        for entry in coll._registry.ordered
        if entry.kind == WEIGHT
    )


# Where dynamo rejects objects as a constant function's arguments, the function is traced like
# any other (see _torch_compat).
_scope_positions = mark_constant(_positions) if CONSTANT_FUNCTIONS_TAKE_OBJECTS else _positions
_held_parameter = mark_constant(_held) if CONSTANT_FUNCTIONS_TAKE_OBJECTS else _held
