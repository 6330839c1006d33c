"""The collection: registering entries, and ``loss()``/``losses()`` over them.

Registration is one path (:meth:`Collection.add_weight`, :meth:`Collection.add_activity`,
:meth:`Collection.add_tensor`), used by the layers, ``add_regularizer``/``regularize``, plans
loaded from JSON and the TF1 layer. Each returns a :class:`Handle` that remembers what the call
replaced, so ``.remove()`` restores exactly that. One regularizer per tensor per collection:
registering again, or on a tied parameter, replaces.
"""

from __future__ import annotations

import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _naming
from ._checks import RegcollectWarning, ScopeArg, check_module, check_scope
from .activity import ActivityHook, Pending, Record
from .engine import Plan
from .entries import ACTIVITY, TENSOR, WEIGHT, Entry, current_tensors, unique_names
from .plans import CachedPlan, PlanCache, mark_constant, traced_tensors
from .readout import Last, Readout, Row, as_dict, check_finite
from .regularizers import Regularizer
from .summary import check_tablefmt, render, table_extra

__all__ = ["Collection", "Handle", "default_collection"]


def _compile_scope(pattern: str) -> Any:
    import re

    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"scope must be a valid regular expression, got {pattern!r}: {exc}"
        ) from None


class Collection:
    """An independent set of penalties. ``rc.get_collection()`` returns the default one.

    Args:
        max_pending: at most this many activity penalties wait for a ``loss()``; past it the
            oldest are dropped, with one warning.
        max_pending_bytes: at most this many bytes of layer outputs are kept alive by waiting
            activity penalties (their autograd graphs); the same rule.
        check_finite: read every ``loss()``'s values back (one host synchronisation) and raise
            ``FloatingPointError`` naming the entries whose penalty is NaN or infinite.

    Examples:
        >>> import torch, regcollect as rc
        >>> coll = rc.Collection()
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0), collection=coll)
        >>> torch.allclose(coll.loss(), layer.weight.abs().sum())
        True
    """

    def __init__(
        self, *, max_pending: int = 256, max_pending_bytes: int = 2**30, check_finite: bool = False
    ) -> None:
        for name, value in (("max_pending", max_pending), ("max_pending_bytes", max_pending_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite
        self.uid = uuid.uuid4().hex
        _by_uid[self.uid] = self
        _live.add(self)
        # Whether loss()/losses() ever ran: if not when an optimizer steps over regularized
        # parameters, the penalties are not part of training and the user is told, once.
        self._consumed = False
        self._warned_forgotten = False
        self._warned_models = False
        self._lock = threading.RLock()
        self._entries: dict[tuple[Any, ...], Entry] = {}
        self._by_tensor: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...]]] = {}
        self._version = 0
        self._has_dead = False
        self._plans = PlanCache()
        self._names_cache: tuple[tuple[int, int], dict[Entry, str]] | None = None
        self.pending = Pending(self.describe, max_pending, max_pending_bytes)
        self._readout = Readout()

    @property
    def max_pending(self) -> int:
        return self.pending.max_count

    @property
    def max_pending_bytes(self) -> int:
        return self.pending.max_bytes

    # Collections are registries, not data: copying a model must not copy its collection, and
    # unpickling in the same process finds the same one (see _restore_collection).
    def __deepcopy__(self, memo: dict[int, Any]) -> Collection:
        return self

    def __copy__(self) -> Collection:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_collection, (self.uid, self is _default))

    def __repr__(self) -> str:
        return f"<regcollect.Collection with {len(self)} entries>"

    def __len__(self) -> int:
        with self._lock:
            self._cleanup()
            return len(self._entries)

    def mark_consumed(self) -> None:
        """Say that this collection's penalties reach a loss by another route (TF1's
        ``apply_regularization`` returns them), so no forgotten-``loss()`` warning is due."""
        self._consumed = True

    # -- registration --

    def _on_death(self, _ref: object) -> None:
        # May run inside the garbage collector in any thread: only set flags here.
        self._has_dead = True
        self._plans = PlanCache()
        self._version += 1

    def add_weight(
        self, module: torch.nn.Module, param: str, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Register ``regularizer`` on ``module._parameters[param]``, replacing any previous one."""
        check_module(module)
        if module._parameters.get(param) is None:
            available = [n for n, p in module._parameters.items() if p is not None]
            raise ValueError(
                f"{type(module).__name__} has no parameter {param!r}; its parameters are "
                f"{available}"
            )
        ref = weakref.ref(module, self._on_death)
        entry = Entry(WEIGHT, _checked(regularizer), module_ref=ref, param=param, prefix=prefix)
        return self._insert((ref, param), entry)

    def add_activity(
        self, module: torch.nn.Module, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Penalise ``module``'s output: ``regularizer(output) / batch_size`` per forward pass."""
        ref = weakref.ref(check_module(module), self._on_death)
        entry = Entry(ACTIVITY, _checked(regularizer), module_ref=ref, prefix=prefix)
        return self._insert((ref, ":activity"), entry)

    def add_tensor(
        self, tensor: torch.Tensor, regularizer: Regularizer, name: str, *, prefix: str = ""
    ) -> Handle:
        """Register ``regularizer`` on a bare tensor (held weakly) under ``name``."""
        ref = weakref.ref(tensor, self._on_death)
        entry = Entry(
            TENSOR, _checked(regularizer), tensor_ref=ref, explicit_name=name, prefix=prefix
        )
        # Keyed by id: weak references to tensors compare their referents with ==, which is
        # elementwise. A dead tensor's entry is cleaned up before its id can be reused.
        return self._insert((TENSOR, id(tensor)), entry)

    def entry_for(self, module: torch.nn.Module, param: str | None) -> Entry | None:
        """The entry on ``module``'s parameter ``param`` (None: its output), if registered."""
        return self._entries.get((weakref.ref(module), param if param else ":activity"))

    def _insert(self, key: tuple[Any, ...], entry: Entry) -> Handle:
        with self._lock:
            self._cleanup()
            replaced: list[Entry] = []
            old = self._entries.pop(key, None)
            if old is not None:
                self._detach(old)
                replaced.append(old)
            tensor = entry.resolve()
            if tensor is not None:
                # One regularizer per parameter: a tied parameter reached through another
                # module replaces the earlier entry instead of counting twice.
                previous = self._by_tensor.get(id(tensor))
                if previous is not None and previous[0]() is tensor:
                    tied = self._entries.pop(previous[1], None)
                    if tied is not None:
                        self._detach(tied)
                        replaced.append(tied)
                self._by_tensor[id(tensor)] = (weakref.ref(tensor), key)
            entry._key = key
            entry._replaced = replaced
            self._entries[key] = entry
            module = entry.module
            if module is not None:
                _naming.track(module)
                if entry.kind == ACTIVITY:
                    entry._hook = module.register_forward_hook(ActivityHook(self, entry))
            self._changed()
            return Handle([(self, entry)])

    def _changed(self) -> None:
        self._version += 1
        self._plans = PlanCache()

    def _detach(self, entry: Entry) -> None:
        if entry._hook is not None:
            entry._hook.remove()
            entry._hook = None
            self.pending.discard(lambda r: r.entry is not entry)

    def _discard(self, entry: Entry) -> bool:
        """Remove ``entry`` if it is still registered here (not replaced since)."""
        with self._lock:
            if self._entries.get(entry._key) is not entry:
                return False
            del self._entries[entry._key]
            self._detach(entry)
            self._changed()
            return True

    def _restore(self, entry: Entry) -> None:
        """Register a replaced ``entry`` again, unless its place has been taken since; a
        retired one (its handle removed meanwhile) gives way to what it replaced."""
        with self._lock:
            if entry._retired:
                for old in entry._replaced:
                    self._restore(old)
            elif entry.alive and entry._key not in self._entries:
                replaced = entry._replaced
                self._insert(entry._key, entry)
                entry._replaced = replaced

    def _cleanup(self) -> None:
        if not self._has_dead:
            return
        self._has_dead = False
        dead = [key for key, entry in self._entries.items() if not entry.alive]
        for key in dead:
            self._detach(self._entries.pop(key))
        self._by_tensor = {k: v for k, v in self._by_tensor.items() if v[0]() is not None}
        self.pending.discard(lambda r: r.entry.alive)
        if dead:
            self._changed()

    def remove(self, module: torch.nn.Module) -> int:
        """Remove the entries on ``module`` and its submodules; return how many."""
        ids = {id(m) for m in check_module(module).modules()}
        with self._lock:
            doomed = [e for e in self._entries.values() if id(e.module) in ids]
            for entry in doomed:
                self._discard(entry)
            return len(doomed)

    def clear(self) -> None:
        """Remove every entry and every recorded activity penalty; start over as if new."""
        with self._lock:
            for entry in self._entries.values():
                self._detach(entry)
            self._entries.clear()
            self._by_tensor.clear()
            self.pending.clear()
            self._readout.clear()
            self._consumed = self._warned_forgotten = False
            self._warned_models = False
            self._changed()

    # -- names and scopes --

    def _names(self) -> dict[Entry, str]:
        with self._lock:
            self._cleanup()
            key = (self._version, _naming.version())
            if self._names_cache is not None and self._names_cache[0] == key:
                return self._names_cache[1]
            names = unique_names(self._entries.values())
            for entry, name in names.items():
                entry._name = name
            self._names_cache = (key, names)
            return names

    def describe(self, entry: Entry) -> str:
        """``"entry 'name'"`` for error messages."""
        return f"entry {self._names().get(entry, entry.base_name()[0])!r}"

    def _in_scope(self, scope: str | tuple[torch.nn.Module, ...] | None) -> list[Entry]:
        """The live entries a checked scope covers, in registration order."""
        if scope is None:
            self._cleanup()
            return list(self._entries.values())
        if isinstance(scope, str):
            pattern = _compile_scope(scope)
            return [e for e, n in self._names().items() if pattern.match(n)]
        self._cleanup()
        for root in scope:
            # A model restored by pickle or deepcopy has no recorded parent links yet.
            _naming.record_tree(root)
        ids = {id(m) for root in scope for m in root.modules()}
        return [e for e in self._entries.values() if id(e.module) in ids]

    def _view(self, scope: ScopeArg) -> tuple[list[Entry], dict[Entry, str]]:
        """Entries in ``scope`` and their names: unique among them for a model scope, so the
        model passed keeps its plain names (``0.weight``) whatever other models exist."""
        checked = check_scope(scope)
        with self._lock:
            entries = self._in_scope(checked)
            if isinstance(checked, tuple):
                return entries, unique_names(entries)
            names = self._names()
            return entries, {e: names[e] for e in entries}

    def entries(self, scope: ScopeArg = None) -> list[Entry]:
        """Live entries in registration order, optionally filtered by ``scope``."""
        return self._view(scope)[0]

    # -- computing --

    def _plan(self, scope: ScopeArg) -> tuple[Any, CachedPlan]:
        checked = check_scope(scope)
        if isinstance(checked, tuple):
            key: Any = tuple(map(id, checked))
            roots: Sequence[torch.nn.Module] = checked
        else:
            key, roots = checked, ()
        with self._lock:
            self._cleanup()

            def build() -> tuple[list[Entry], list[Entry]]:
                in_scope = self._in_scope(checked)
                return in_scope, [e for e in in_scope if e.kind != ACTIVITY]

            cached = self._plans.get(
                key,
                (self._version, _naming.version()),
                roots,
                build,
                self._describer,
                _models if checked is None else None,
            )
            return key, cached

    def _describer(self, entries: list[Entry]) -> Callable[[int], str]:
        """Names ``entries[i]`` in engine error messages (resolved only on error)."""
        return lambda i: self.describe(entries[i])

    def _warn_models(self, cached: CachedPlan, records: list[Record]) -> None:
        """Warn once when an unscoped loss() sums separate models (until clear())."""
        groups = cached.weight_models
        if records:
            extra = {cached.models.get(id(r.entry), -1) for r in records} - {-1}
            if not extra <= groups:
                groups = groups | extra
        if len(groups) < 2:
            return
        if self._warned_models:
            return
        self._warned_models = True
        names = self._names()
        described = []
        for group in sorted(groups):
            members = [e for e in cached.in_scope if cached.models.get(id(e)) == group]
            if not members:
                continue
            root = _naming.path_to_root(members[0].module)[0] if members[0].module else None
            label = f"{type(root).__name__} {_naming.auto_name(root)!r}" if root else "?"
            shown = ", ".join(names.get(e, "?") for e in members[:3])
            described.append(f"{label} ({shown}{', ...' if len(members) > 3 else ''})")
        warnings.warn(
            f"rc.loss() adds up the penalties of {len(groups)} separate models: "
            f"{'; '.join(described)}. If only one is being trained, pass it (rc.loss(model), "
            "or a list of models), give each model its own rc.Collection(), or delete the "
            "models you no longer use.",
            RegcollectWarning,
            stacklevel=4,
        )

    def loss(self, scope: ScopeArg = None) -> torch.Tensor:
        """Sum of the penalties in ``scope``: weights, plus the activity penalties recorded since.

        Args:
            scope: None for every entry; a regular expression matched at the start of entry
                names (``"decoder/"``); or an ``nn.Module`` (or a list of them): the entries in
                those modules' subtrees, like Keras's ``model.losses``.

        Returns:
            A 0-dim tensor, differentiable, on the parameters' device, float32 at least;
            ``tensor(0.)`` when nothing is registered. Reads nothing back to the host.
        """
        if torch.compiler.is_compiling():
            return self._traced_loss(scope)
        key, cached = self._plan(scope)
        records = self.pending.take(None if key is None else _ids_in(cached.in_scope_ids))
        if key is None:
            self._warn_models(cached, records)
        result = cached.plan()
        total = _with_records(result.total, [r.value for r in records], bool(cached.entries))
        self._readout.store(
            key,
            Last(
                cached.entries, result.parts, [(r.entry, r.value) for r in records], cached.activity
            ),
        )
        self._consumed = True
        if self.check_finite:
            self.assert_finite(scope)
        return total

    def _traced_loss(self, scope: ScopeArg) -> torch.Tensor:
        """``loss()`` while torch.compile traces: no lock, no cache, no warning.

        Dynamo turns this into guards on the entries and the modules' parameters and a graph
        of the penalty math, so a compiled step has no graph break here. A ``scope`` is
        matched against the names once, when the step is traced (:func:`_scope_positions`).
        """
        in_scope = list(self._entries.values())
        if scope is not None:
            if not isinstance(scope, str):
                check_scope(scope)  # raises the TypeError of the eager path
            found = _scope_positions(self, scope)
            if isinstance(found, str):  # an invalid regular expression
                raise ValueError(found)
            in_scope = [in_scope[i] for i in found]
        candidates = [e for e in in_scope if e.kind != ACTIVITY]
        tensors = traced_tensors(candidates)
        chosen: dict[int, int] = {}
        for i, t in enumerate(tensors):
            if t is not None and t.requires_grad:
                chosen[id(t)] = i
        order = sorted(chosen.values())
        entries = [candidates[i] for i in order]
        plan = Plan([tensors[i] for i in order], [e.regularizer for e in entries])  # type: ignore[misc]
        keep = None if scope is None else frozenset(map(id, in_scope))
        records = self.pending.take_traced(keep)
        result = plan()
        self._readout.store(
            scope
            if isinstance(scope, str) or scope is None
            else tuple(map(id, check_scope(scope) or ())),
            Last(
                entries,
                result.parts,
                [(r.entry, r.value) for r in records],
                [e for e in in_scope if e.kind == ACTIVITY],
            ),
        )
        self._consumed = True
        return _with_records(result.total, [r.value for r in records], bool(entries))

    def losses(self, scope: ScopeArg = None) -> list[torch.Tensor]:
        """One differentiable 0-dim tensor per entry that contributes, in registration order.

        Weight entries are evaluated one by one (use :meth:`loss` in training loops); an
        activity entry gives the sum of its penalties recorded since the last call.
        """
        key, cached = self._plan(scope)
        records = self.pending.take(None if key is None else _ids_in(cached.in_scope_ids))
        by_entry: dict[Entry, list[torch.Tensor]] = {}
        for r in records:
            by_entry.setdefault(r.entry, []).append(r.value)
        position = {id(e): i for i, e in enumerate(cached.entries)}
        out: list[torch.Tensor] = []
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for entry in cached.in_scope:
            i = position.get(id(entry))
            if i is not None:
                # A one-tensor plan: sharded tensors are completed exactly, as in loss().
                tensor = cached.plan.tensors[i]
                value = Plan([tensor], [entry.regularizer], self._describer([entry]))().total
                out.append(value)
                parts.append((value.detach().reshape(1), [i]))
            elif entry in by_entry:
                out.append(torch.stack(by_entry[entry]).sum())
        self._readout.store(
            key, Last(cached.entries, parts, [(r.entry, r.value) for r in records], cached.activity)
        )
        self._consumed = True
        if self.check_finite:
            self.assert_finite(scope)
        return out

    # -- reading the last values --

    def _rows(
        self, scope: ScopeArg, extra: Sequence[torch.Tensor] = ()
    ) -> tuple[list[Row], float, list[float]]:
        entries, names = self._view(scope)
        return self._readout.rows(entries, names, extra)

    def assert_finite(self, scope: ScopeArg = None) -> None:
        """Raise ``FloatingPointError`` naming every entry whose last penalty is NaN or inf.

        Reads the values of the last :meth:`loss` (one device-to-host copy). Weights that are
        NaN or infinite always make ``loss()`` non-finite; this turns that into an error that
        says where. ``Collection(check_finite=True)`` runs it after every ``loss()``.
        """
        check_finite(self._rows(scope)[0])

    def penalties(self, scope: ScopeArg = None) -> dict[str, float]:
        """``{entry name: penalty, ..., "total": sum}`` from the last :meth:`loss` call."""
        rows, total, _ = self._rows(scope)
        return as_dict(rows, total)

    def summary(
        self,
        loss: torch.Tensor | float | None = None,
        scope: ScopeArg = None,
        *,
        tablefmt: str = "simple",
        file: IO[str] | None = None,
    ) -> str:
        """Print and return the table of penalties; see :func:`regcollect.summary`."""
        check_tablefmt(tablefmt)
        extra, loss_value = table_extra(loss)
        rows, total, extra_values = self._rows(scope, extra)
        if extra_values:
            loss_value = extra_values[0]
        return render(rows, total, loss_value, tablefmt=tablefmt, file=file)


def _checked(regularizer: object) -> Regularizer:
    if not isinstance(regularizer, Regularizer):
        raise TypeError(
            "regularizer must be a regcollect.Regularizer (use regcollect.regularizers.get), "
            f"got {type(regularizer).__name__}"
        )
    return regularizer


def _ids_in(ids: frozenset[int]) -> Callable[[Entry], bool]:
    return lambda entry: id(entry) in ids


def _with_records(
    total: torch.Tensor, values: list[torch.Tensor], has_weights: bool
) -> torch.Tensor:
    if not values:
        return total
    if not has_weights:
        total = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    return total + torch.stack([v.to(device=total.device) for v in values]).sum()


def _models(entries: list[Entry]) -> dict[int, int]:
    """``id(entry) -> model number``: entries whose outermost models share a module are one
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


class Handle:
    """What registration returns: ``.remove()`` undoes exactly what the call did, restoring
    the regularizers it replaced. Also a context manager, removing its entries on exit."""

    def __init__(self, added: Sequence[tuple[Collection, Entry]] = ()) -> None:
        self._added = list(added)

    @classmethod
    def join(cls, handles: Sequence[Handle]) -> Handle:
        return cls([item for h in handles for item in h._added])

    @property
    def entries(self) -> list[Entry]:
        """The entries this call added that are still registered, with their names resolved."""
        return [e for c, e in self._added if e in c._names()]

    def remove(self) -> None:
        for collection, entry in reversed(self._added):
            if collection._discard(entry):
                for old in entry._replaced:
                    collection._restore(old)
            else:
                entry._retired = True
        self._added = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._added)

    def __repr__(self) -> str:
        return f"<regcollect.Handle of {len(self._added)} entries>"


_live: weakref.WeakSet[Collection] = weakref.WeakSet()
_by_uid: weakref.WeakValueDictionary[str, Collection] = weakref.WeakValueDictionary()
_warned_lost = False


def _restore_collection(uid: str, was_default: bool) -> Collection:
    """Unpickling a collection: the same one while it is alive in this process, else the
    default collection (with one warning when the original was a custom one)."""
    global _warned_lost
    found = _by_uid.get(uid)
    if found is not None:
        return found
    if not was_default and not _warned_lost:
        _warned_lost = True
        warnings.warn(
            "an unpickled (or torch.load-ed) layer belonged to a regcollect.Collection that "
            "does not exist in this process; its regularizers are registered in the default "
            "collection instead. Pass collection=... when you rebuild, or move them with "
            "Collection.remove() and rc.load_plan().",
            RegcollectWarning,
            stacklevel=2,
        )
    return _default


def default_collection() -> Collection:
    """The default collection, used when no ``collection=`` is given."""
    return _default


def _forgotten_loss_check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step hook: warn once per collection whose penalties never reach a loss."""
    for coll in list(_live):
        if coll._consumed or coll._warned_forgotten or not coll._entries:
            continue
        with coll._lock:
            entries = list(coll._entries.values())
            tensors = current_tensors([e.locator for e in entries])
            pending = bool(coll.pending)
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = [e for e, t in zip(entries, tensors) if t is not None and id(t) in ids]
        if not trained and not pending:
            continue
        coll._warned_forgotten = True
        names = coll._names()
        example = names.get(trained[0] if trained else entries[0], "?")
        warnings.warn(
            f"{len(entries)} regularization penalties (e.g. {example!r}) are registered, but "
            f"{type(optimizer).__name__}.step() ran before rc.loss() was ever called: the "
            "penalties are not part of training. Add rc.loss() to the loss you backpropagate "
            "(total_loss = loss + rc.loss()).",
            RegcollectWarning,
            stacklevel=3,
        )


register_optimizer_step_post_hook(_forgotten_loss_check)


@mark_constant
def _scope_positions(coll: Collection, scope: Any) -> tuple[int, ...] | str:
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
    return tuple(i for i, e in enumerate(coll._entries.values()) if id(e) in keep)


_default = Collection()
