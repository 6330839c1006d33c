"""The registry: entries, one per tensor, registered through one path.

Registration is ``Registry.add_weight``, ``Registry.add_activity`` and
``Registry.add_tensor``, used by the layers, ``add_regularizer``/``regularize``, plans loaded
from JSON and the TF1 layer. Each returns a ``regcollect._handle.Handle`` that remembers
what the call replaced, so ``.remove()`` restores exactly that. One regularizer per tensor:
registering again, or on a tied parameter, replaces. Entries hold modules weakly; a dead
module's entries are dropped at the next access. Names and scopes are resolved here too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import _locks, _naming
from .._checks import ScopeArg, check_module, check_scope
from .._distributed.placement import parts_message
from .._distributed.seam import engine_in_parts, holds
from .._engine.plan import powers
from .._optim import following as _following
from .._penalties.kernel import kernel_of
from ..regularizers import Regularizer
from .activity import Activity
from .entries import ACTIVITY, TENSOR, WEIGHT, Entry, parametrized_tensors, tied_name, unique_names
from .handle import Handle, Undo, restorable

__all__ = ["Registry"]


def _compile_scope(pattern: str) -> Any:
    import re

    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"scope must be a valid regular expression, got {pattern!r}: {exc}"
        ) from None


def _checked(regularizer: object) -> Regularizer:
    if not isinstance(regularizer, Regularizer):
        raise TypeError(
            "regularizer must be a regcollect.Regularizer (use regcollect.regularizers.get), "
            f"got {type(regularizer).__name__}"
        )
    return regularizer


class Registry:
    """Entries and their registration; a part of ``regcollect._collection.Collection``.

    Args:
        on_register: Called at every registration (the collection installs its
            optimizer-step hook with the first).
        on_empty: Called, outside the lock, when removals leave it empty (the collection
            takes out the process-wide hooks when no collection needs them).
    """

    def __init__(
        self, on_register: Callable[[], None], on_empty: Callable[[], None] = lambda: None
    ) -> None:
        self.lock = _locks.RLock()
        self._entries: dict[tuple[Any, ...], Entry] = {}
        # The undo record of each registered entry, by the same keys.
        self._records: dict[tuple[Any, ...], Undo] = {}
        self._by_tensor: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...]]] = {}
        self.version = 0
        # The entries in registration order, as a tuple: what a compiled loss() reads (dynamo
        # before torch 2.13 cannot trace a dict keyed by weak references).
        self.ordered: tuple[Entry, ...] = ()
        self._has_dead = False
        self._names_cache: tuple[tuple[int, int], dict[Entry, str]] | None = None
        # The activity entries' penalties of the current forward pass, and their hooks.
        self.activity = Activity(self)
        self._on_register = on_register
        self._on_empty = on_empty

    def __len__(self) -> int:
        with self.lock:
            self._cleanup()
            return len(self._entries)

    # -- registration --

    def _on_death(self, _ref: object) -> None:
        # May run inside the garbage collector in any thread: only set flags here.
        self._has_dead = True
        self._changed()

    def add_weight(
        self, module: torch.nn.Module, param: str, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Register ``regularizer`` on ``module._parameters[param]``, replacing any previous one."""
        check_module(module)
        if module._parameters.get(param) is None and not holds(module, param):
            available = [n for n, p in module._parameters.items() if p is not None]
            raise ValueError(
                f"{type(module).__name__} has no parameter {param!r}; its parameters are "
                f"{available}"
            )
        ref = weakref.ref(module, self._on_death)
        entry = Entry(
            WEIGHT,
            _checked(regularizer),
            module_ref=ref,
            param=param,
            prefix=prefix,
            key=(ref, param),
        )
        if getattr(module, "sparse", False) is True and param == "weight":
            # Embedding(sparse=True): a dense penalty gradient would make the whole table's
            # gradient dense, which SparseAdam and sparse SGD reject.
            raise ValueError(
                f"entry {entry.base_name()[0]!r}: {type(module).__name__}(sparse=True) gets sparse "
                "gradients, and a weight penalty's gradient is dense. Regularize the rows "
                "looked up instead, through the output: activity_regularizer=... (or "
                "rc.add_activity_regularizer), or use sparse=False."
            )
        return self._insert(entry)

    def add_activity(
        self, module: torch.nn.Module, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Penalise ``module``'s output: ``regularizer(output) / batch_size`` per forward pass."""
        ref = weakref.ref(check_module(module), self._on_death)
        entry = Entry(
            ACTIVITY, _checked(regularizer), module_ref=ref, prefix=prefix, key=(ref, ":activity")
        )
        return self._insert(entry)

    def add_tensor(
        self, tensor: torch.Tensor, regularizer: Regularizer, name: str, *, prefix: str = ""
    ) -> Handle:
        """Register ``regularizer`` on a bare tensor (held weakly) under ``name``."""
        ref = weakref.ref(tensor, self._on_death)
        # Keyed by id: weak references to tensors compare their referents with ==, which is
        # elementwise. A dead tensor's entry is cleaned up before its id can be reused.
        entry = Entry(
            TENSOR,
            _checked(regularizer),
            tensor_ref=ref,
            explicit_name=name,
            prefix=prefix,
            key=(TENSOR, id(tensor)),
        )
        return self._insert(entry)

    def entry_for(self, module: torch.nn.Module, param: str | None) -> Entry | None:
        """The entry on ``module``'s parameter ``param`` (None: its output), if registered."""
        return self._entries.get((weakref.ref(module), param if param else ":activity"))

    def _insert(self, entry: Entry, record: Undo | None = None) -> Handle:
        """Register ``entry`` at its key, replacing what is there; ``record``: the undo record
        of a replaced registration being restored, which keeps what it had replaced."""
        key = entry.key
        self._on_register()
        with self.lock:
            self._cleanup()
            # Checked first, so that a failure (an axis out of range, an L2SP reference of
            # another shape, a tied weight with another regularizer) changes nothing.
            tensor = self._checked_tensor(key, entry)
            module = entry.module
            if entry.kind == WEIGHT and module is not None and entry.param is not None:
                kernel_of(entry.regularizer).attach(entry.regularizer, module, entry.param)
            replaced = self._take_place(key, entry, tensor)
            records = [self._records.pop(e.key) for e in replaced]
            if record is None:
                record = Undo(entry, restorable(records, entry))
            self._entries[key] = entry
            self._records[key] = record
            for gone in replaced:
                # Replaced, not removed: removing the new entry may restore it, so its state
                # on the module (an L2SP reference buffer) stays.
                self._release(gone, keep_state=True)
            device = _device_of(tensor, module)
            for schedule in kernel_of(entry.regularizer).schedules(entry.regularizer):
                _following.follow(schedule, entry)
                if device is not None:
                    schedule.tensor(device)  # made here, not inside a compiled trace
            if module is not None:
                _naming.track(module)
                if entry.kind == ACTIVITY:
                    self.activity.add(entry)
            self._changed()
            return Handle([(self, record)])

    def _checked_tensor(self, key: tuple[Any, ...], entry: Entry) -> torch.Tensor | None:
        """The tensor ``entry`` regularizes, once everything that could refuse it has been
        asked: the engine holding it in parts, the penalty's own check, a tied weight."""
        tensor = entry.resolve()
        for term, _ in kernel_of(entry.regularizer).terms(entry.regularizer):
            if term.p not in (None, 1, 2):
                raise ValueError(
                    f"{entry.base_name()[0]!r}: {type(term).__name__} has p = {term.p}; the "
                    "grouped kernels compute sums of |x|**p for p 1 or 2 only. Give the term "
                    "p = None (its penalty is then called on each tensor), or leave the "
                    "kernel's terms empty."
                )
        if entry.kind == WEIGHT and powers(entry.regularizer) is None:
            # An FSDP1 shard or flat parameter, a ZeRO-3 partition: only sums of p-norm
            # powers are completed across ranks (the engine's rule; it refuses the rest at
            # loss() when registered before wrapping).
            engine = engine_in_parts(tensor, entry.module, entry.param)
            if engine is not None:
                message = parts_message(entry.regularizer, engine)
                raise ValueError(f"{entry.base_name()[0]!r}: {message}")
        if tensor is not None and entry.kind != ACTIVITY:
            try:
                kernel_of(entry.regularizer).check(entry.regularizer, tensor)
            except ValueError as exc:
                raise ValueError(f"{entry.base_name()[0]!r}: {exc}") from None
            self._check_tied(key, entry, tensor)
        return tensor

    def _take_place(
        self, key: tuple[Any, ...], entry: Entry, tensor: torch.Tensor | None
    ) -> list[Entry]:
        """Take out what ``entry`` replaces: the entry on the same parameter, and one on the
        same tensor through another module (a tied weight with an equal regularizer, so that
        it counts once; _check_tied refused a different one). Returns them."""
        replaced: list[Entry] = []
        old = self._entries.pop(key, None)
        if old is not None:
            self._detach(old)
            replaced.append(old)
        if tensor is not None:
            previous = self._by_tensor.get(id(tensor))
            if previous is not None and previous[0]() is tensor:
                tied = self._entries.pop(previous[1], None)
                if tied is not None:
                    self._detach(tied)
                    replaced.append(tied)
            self._by_tensor[id(tensor)] = (weakref.ref(tensor), key)
        return replaced

    def _check_tied(self, key: tuple[Any, ...], entry: Entry, tensor: torch.Tensor) -> None:
        """A tensor another module already holds (tied weights) gets one regularizer: an equal
        one replaces the other entry, a different one is refused, naming both."""
        previous = self._by_tensor.get(id(tensor))
        if previous is None or previous[0]() is not tensor or previous[1] == key:
            return
        other = self._entries.get(previous[1])
        if other is not None and other.regularizer != entry.regularizer:
            names = (self._names().get(other, other.base_name()[0]), entry.base_name()[0])
            raise ValueError(tied_name(names, (other.regularizer, entry.regularizer)))

    def _changed(self) -> None:
        self.version += 1
        self.ordered = tuple(self._entries.values())

    def _detach(self, entry: Entry) -> None:
        self._detach_all([entry])

    def _detach_all(self, entries: list[Entry]) -> None:
        """Activity entries among ``entries`` stop recording (one rebuild of the hooks)."""
        activity = [e for e in entries if e.kind == ACTIVITY]
        if activity:
            self.activity.remove(activity)

    def _discard(self, entry: Entry) -> Undo | None:
        """Remove ``entry`` if it is still registered here (not replaced since); return its
        undo record, or None."""
        with self.lock:
            if self._entries.get(entry.key) is not entry:
                return None
            del self._entries[entry.key]
            record = self._records.pop(entry.key)
            self._detach(entry)
            self._release(entry)
            self._changed()
            return record

    def _release(self, entry: Entry, keep_state: bool = False) -> None:
        """What a weight entry no longer registered leaves on its module (an L2SP reference
        buffer) goes, unless ``keep_state``: a replaced entry, which removing its replacement
        restores; ``clear()``, which empties the collection, not the model."""
        module = entry.module
        if (
            not keep_state
            and entry.kind == WEIGHT
            and module is not None
            and entry.param is not None
        ):
            kernel_of(entry.regularizer).detach(entry.regularizer, module, entry.param)
        if kernel_of(entry.regularizer).schedules(entry.regularizer):
            _following.changed()

    def _restore(self, record: Undo) -> None:
        """Register a replaced registration's entry again, unless its place has been taken
        since; a retired one (its handle removed meanwhile) gives way to what it replaced."""
        with self.lock:
            if record.retired:
                for old in record.replaced:
                    self._restore(old)
            elif record.entry.alive and record.entry.key not in self._entries:
                self._insert(record.entry, record)

    def _cleanup(self) -> None:
        if not self._has_dead:
            return
        self._has_dead = False
        dead = [key for key, entry in self._entries.items() if not entry.alive]
        for key in dead:
            self._records.pop(key, None)
        self._detach_all([self._entries.pop(key) for key in dead])
        self._by_tensor = {k: v for k, v in self._by_tensor.items() if v[0]() is not None}
        if dead:
            self._changed()

    def _follow_parametrizations(self) -> None:
        """Move weight entries whose parameter was parametrized after registration onto the
        tensors that now hold it, as ``regcollect.regularize`` registers such weights."""
        moved = []
        for entry in self._entries.values():
            module = entry.module
            if entry.kind == WEIGHT and module is not None:
                if module._parameters.get(entry.param) is None:
                    targets = parametrized_tensors(module, entry.param)
                    if targets:
                        moved.append((entry, targets))
        for entry, targets in moved:
            self._discard(entry)
            for owner, name in targets:
                self.add_weight(owner, name, entry.regularizer, prefix=entry.prefix)

    def remove(self, module: torch.nn.Module) -> int:
        """Remove the entries on ``module`` and its submodules; return how many."""
        ids = {id(m) for m in check_module(module).modules()}
        with self.lock:
            doomed = [e for e in self._entries.values() if id(e.module) in ids]
            self._detach_all(doomed)  # the activity hooks: one rebuild for all
            for entry in doomed:
                self._discard(entry)
        self.settle()
        return len(doomed)

    def clear(self) -> None:
        """Remove every entry and every recorded activity penalty; start over as if new."""
        with self.lock:
            removed = list(self._entries.values())
            self._detach_all(removed)
            self._entries.clear()
            self._records.clear()
            for entry in removed:
                self._release(entry, keep_state=True)
            self._by_tensor.clear()
            self.activity.clear()
            self._changed()
        self.settle()

    def settle(self) -> None:
        """After removals (called outside the lock): empty, say so (``on_empty``)."""
        if not len(self):
            self._on_empty()

    # -- names and scopes --

    def _names(self) -> dict[Entry, str]:
        with self.lock:
            self._cleanup()
            key = (self.version, _naming.version())
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
        self._follow_parametrizations()
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
        with self.lock:
            entries = self._in_scope(checked)
            if isinstance(checked, tuple):
                return entries, unique_names(entries)
            names = self._names()
            return entries, {e: names[e] for e in entries}

    def entries(self, scope: ScopeArg = None) -> list[Entry]:
        """Live entries in registration order, optionally filtered by ``scope``."""
        return self._view(scope)[0]


def _device_of(tensor: torch.Tensor | None, module: torch.nn.Module | None) -> torch.device | None:
    """Where an entry's coefficients live: its tensor's device, or for a layer's output that
    of the layer's first parameter (the CPU for a layer without any)."""
    if tensor is not None:
        return tensor.device
    if module is None:
        return None
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
