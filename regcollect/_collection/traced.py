"""The view ``loss()`` evaluates while ``torch.compile`` traces: the same choice as the eager
path, made without lock, cache or warning, so that dynamo turns it into guards and a graph with
no break. The collection evaluates it as it evaluates a cached one (``Collection._evaluate``).
"""

from __future__ import annotations

from .._checks import ScopeArg, check_scope
from .._distributed.seam import engine_in_parts
from .._engine.plan import Plan
from .._torch_compat import CONSTANT_FUNCTIONS_TAKE_OBJECTS
from .entries import ACTIVITY, WEIGHT
from .plans import View, applied, choose, mark_constant, traced_tensors
from .registry import Registry

__all__ = ["traced_view"]


def traced_view(registry: Registry, scope: ScopeArg, held: set[int]) -> View | None:
    """The view of ``scope`` while torch.compile traces, with ``held`` the ids of the tensors
    an optimizer applies the penalties of; None when only the eager path can evaluate it.

    Dynamo turns this into guards on the entries and the modules' parameters and a graph
    of the penalty math, so a compiled step has no graph break here. A ``scope`` is
    matched against the names once, when the step is traced (``_scope_positions``).
    """
    if _held_parameter(registry):
        # Completed across the ranks, its gradient handed to the engine: the eager path only.
        return None
    in_scope = list(registry.ordered)
    if scope is not None:
        check_scope(scope)  # the eager path's errors
        found = _scope_positions(registry, scope)
        if isinstance(found, str):  # an invalid regular expression
            raise ValueError(found)
        in_scope = [in_scope[i] for i in found]
    candidates = [e for e in in_scope if e.kind != ACTIVITY]
    current = traced_tensors(candidates)
    entries, tensors = [], []
    for i in choose(candidates, current):  # a loop: dynamo before torch 2.7 misreads a walrus
        tensor = current[i]
        if tensor is not None:
            entries.append(candidates[i])
            tensors.append(tensor)
    return View(
        plan=Plan(tensors, applied(entries), lambda i: repr(entries[i].name), no_grad=held),
        entries=entries,
        in_scope=in_scope,
        activity=[e for e in in_scope if e.kind == ACTIVITY],
    )


def _positions(registry: Registry, scope: ScopeArg) -> tuple[int, ...] | str:
    """Positions, among the registry's entries, of those ``scope`` covers.

    While torch.compile traces, this runs once, outside the graph, and its result is a
    constant of the graph: names and regular expressions are Python work that dynamo would
    otherwise break the graph for. The entries themselves are guarded, so adding or removing
    one retraces; a name that changes later without that (a module renamed) is not seen.
    An invalid regular expression gives the error message, for the caller to raise: raised
    here, it would reach the user wrapped in a dynamo error.
    """
    try:
        keep = set(map(id, registry.entries(scope)))
    except ValueError as exc:
        return str(exc)
    return tuple(i for i, e in enumerate(registry.ordered) if id(e) in keep)


def _held(registry: Registry) -> bool:
    """Whether an engine holds a parameter of the registry's entries in parts across the
    ranks (FSDP1, ZeRO-3): only the eager path completes its penalty and hands its gradient to
    the engine, so ``loss()`` runs eagerly then, outside the graph.

    Like ``_positions``, this runs once, outside the graph, when torch.compile traces.
    """
    return any(
        engine_in_parts(entry.resolve(), entry.module, entry.param) is not None
        for entry in registry.ordered
        if entry.kind == WEIGHT
    )


# Where dynamo rejects objects as a constant function's arguments, the function is traced like
# any other (see _torch_compat).
_scope_positions = mark_constant(_positions) if CONSTANT_FUNCTIONS_TAKE_OBJECTS else _positions
_held_parameter = mark_constant(_held) if CONSTANT_FUNCTIONS_TAKE_OBJECTS else _held
