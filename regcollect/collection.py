"""The collection: entries, names, scopes and ``loss()``.

An *entry* is one regularizer on one thing: a parameter of a module (looked up by name at
``loss()`` time, so replaced parameters, ``.to()`` and sharding keep working), a module's output
(an activity entry) or a bare tensor (TF1's ``apply_regularization``). Entries hold what they
regularize weakly: a deleted model stops counting and nothing leaks. The only global state is
the default collection and the stack of active :func:`scope` blocks.
"""

from __future__ import annotations

import contextvars
import functools
import math
import operator
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _naming
from .engine import Plan
from .regularizers import Regularizer, accumulation_dtype
from .regularizers import get as get_regularizer

__all__ = [
    "RegcollectWarning",
    "Collection",
    "Entry",
    "Handle",
    "assert_finite",
    "get_collection",
    "loss",
    "get_regularization_loss",
    "get_regularization_losses",
    "penalties",
    "scope",
]

WEIGHT, ACTIVITY, TENSOR = "weight", "activity", "tensor"


class RegcollectWarning(UserWarning):
    """Something regcollect cannot fix for you, such as penalties that are never consumed."""


class Entry:
    """One regularizer on one parameter, module output or tensor. Read-only for users."""

    __slots__ = (
        "__weakref__",
        "explicit_name",
        "hook_handle",
        "key",
        "kind",
        "module_ref",
        "name",
        "param",
        "prefix",
        "regularizer",
        "tensor_ref",
    )

    def __init__(
        self,
        kind: str,
        regularizer: Regularizer,
        *,
        module_ref: weakref.ref[torch.nn.Module] | None = None,
        param: str | None = None,
        tensor_ref: weakref.ref[torch.Tensor] | None = None,
        prefix: str = "",
        explicit_name: str | None = None,
    ) -> None:
        self.kind = kind
        self.regularizer = regularizer
        self.module_ref = module_ref
        self.param = param
        self.tensor_ref = tensor_ref
        self.prefix = prefix
        self.explicit_name = explicit_name
        self.hook_handle: Any = None
        self.key: tuple[Any, ...] = ()
        self.name: str = ""

    @property
    def module(self) -> torch.nn.Module | None:
        """The module holding the parameter (or producing the output); None once deleted."""
        return None if self.module_ref is None else self.module_ref()

    @property
    def alive(self) -> bool:
        ref = self.module_ref if self.module_ref is not None else self.tensor_ref
        return ref is not None and ref() is not None

    @property
    def locator(self) -> tuple[Any, str | None]:
        """``(module ref, parameter name)`` for weights, ``(tensor ref, None)`` otherwise."""
        if self.kind == WEIGHT:
            return (self.module_ref, self.param)
        return (self.tensor_ref if self.kind == TENSOR else _dead_ref, None)

    def resolve(self) -> torch.Tensor | None:
        """The tensor this entry regularizes now (None for activity entries and dead ones)."""
        return _current_tensors([self.locator])[0]

    @property
    def shape(self) -> tuple[int, ...] | None:
        tensor = self.resolve()
        if tensor is None:
            return None
        full = getattr(tensor, "full_shape", None)  # sharded tensors report their global shape
        return tuple(full if full is not None else tensor.shape)

    def _base_name(self) -> tuple[str, torch.nn.Module | None]:
        if self.explicit_name is not None:
            return self.prefix + self.explicit_name, None
        module = self.module
        if module is None:
            return self.prefix + "<deleted>", None
        root, path = _naming.path_to_root(module)
        owner = path or _naming.auto_name(module)
        suffix = ":activity" if self.kind == ACTIVITY else f".{self.param}"
        return self.prefix + owner + suffix, root

    def __repr__(self) -> str:
        return f"Entry({self.name or self._base_name()[0]!r}, {self.regularizer!r})"


# --- scopes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScopeFrame:
    name: str
    defaults: dict[str, Regularizer | None]
    collection: Collection | None


_scope_stack: contextvars.ContextVar[tuple[_ScopeFrame, ...]] = contextvars.ContextVar(
    "regcollect_scope", default=()
)


@contextmanager
def scope(
    name: str,
    *,
    kernel_regularizer: object = None,
    bias_regularizer: object = None,
    activity_regularizer: object = None,
    collection: Collection | None = None,
) -> Iterator[None]:
    """Name entries made inside ``name/...`` and give layers made inside default regularizers.

    Like TF1's ``variable_scope(regularizer=...)``: a layer built inside takes the scope's
    ``kernel_regularizer``/``bias_regularizer``/``activity_regularizer`` for the arguments it
    was not given explicitly. Scopes nest (``"encoder/block1/..."``); inner defaults win.

    Examples:
        >>> import regcollect as rc
        >>> with rc.scope("encoder", kernel_regularizer=rc.l2(1e-4)):
        ...     layer = rc.nn.Linear(2, 2)
        >>> layer.kernel_regularizer
        L2(l2=0.0001)
    """
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"scope name must be a non-empty string, got {name!r}")
    if collection is not None and not isinstance(collection, Collection):
        raise TypeError(
            f"collection must be a regcollect.Collection, got {type(collection).__name__}"
        )
    defaults = {
        "kernel_regularizer": get_regularizer(kernel_regularizer),
        "bias_regularizer": get_regularizer(bias_regularizer),
        "activity_regularizer": get_regularizer(activity_regularizer),
    }
    frame = _ScopeFrame(name.strip("/"), defaults, collection)
    token = _scope_stack.set((*_scope_stack.get(), frame))
    try:
        yield
    finally:
        _scope_stack.reset(token)


def current_prefix() -> str:
    """``"outer/inner/"`` for the active scopes, ``""`` outside any."""
    stack = _scope_stack.get()
    return "".join(frame.name + "/" for frame in stack)


def scope_default(argument: str) -> Regularizer | None:
    """The innermost active scope's default for a layer argument such as ``kernel_regularizer``."""
    for frame in reversed(_scope_stack.get()):
        reg = frame.defaults.get(argument)
        if reg is not None:
            return reg
    return None


def active_collection(explicit: Collection | None = None) -> Collection:
    """``explicit`` if given, else the innermost scope's collection, else the default one."""
    if explicit is None and torch.compiler.is_compiling():
        # Scopes are a model-building tool; torch.compile cannot trace ContextVar reads.
        return _default
    if explicit is not None:
        if not isinstance(explicit, Collection):
            raise TypeError(
                f"collection must be a regcollect.Collection, got {type(explicit).__name__}"
            )
        return explicit
    for frame in reversed(_scope_stack.get()):
        if frame.collection is not None:
            return frame.collection
    return _default


# --- the collection ---------------------------------------------------------------------------


@dataclass
class _CachedPlan:
    version: int
    names_version: int | None
    locators: list[tuple[Any, str | None]]
    tensors: list[torch.Tensor | None]
    flags: list[tuple[Any, ...]]
    plan: Plan
    plan_entries: list[Entry]


@dataclass
class _Last:
    """What the last ``loss()`` computed, kept on the device until a summary asks."""

    plan_entries: list[Entry]
    # Detached values only: holding a differentiable total or activity penalty would keep
    # the last step's autograd graph (and what it saved) alive until the next loss().
    parts: list[tuple[torch.Tensor, list[int]]]
    records: list[tuple[Entry, torch.Tensor]]
    skipped: dict[Entry, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records = [(e, v.detach()) for e, v in self.records]


def _compile_scope(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"scope must be a string (a regular expression) or None, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"scope must be a valid regular expression, got {pattern!r}: {exc}"
        ) from None


class Collection:
    """An independent set of penalties. :func:`get_collection` returns the default one.

    Examples:
        >>> import torch, regcollect as rc
        >>> coll = rc.Collection()
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0), collection=coll)
        >>> torch.allclose(coll.loss(), layer.weight.abs().sum())
        True
    """

    def __init__(self, *, max_pending: int = 256, check_finite: bool = False) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        # Opt-in: every loss() reads its values back (one host synchronisation) and raises
        # FloatingPointError naming the entries whose penalty is NaN or infinite.
        self.check_finite = check_finite
        # Whether loss()/losses() ever ran: if not when an optimizer steps over regularized
        # parameters, the penalties are not part of training and the user is told, once.
        self._consumed = False
        self._warned_forgotten = False
        _live.add(self)
        # Each pending activity penalty keeps its forward pass's graph alive until loss()
        # consumes it; past this many, the oldest are dropped (with a warning), so a
        # forgotten loss() costs bounded memory instead of an out-of-memory crash.
        self.max_pending = max_pending
        self._warned = False
        self._lock = threading.RLock()
        self._entries: dict[tuple[Any, ...], Entry] = {}
        self._by_tensor: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...]]] = {}
        self._version = 0
        self._has_dead = False
        # Per scope, the plans for the last two sets of tensors: FSDP2 swaps a root module's
        # parameters between sharded and unsharded objects every step.
        self._plans: dict[str | None, list[_CachedPlan]] = {}
        self._names_cache: tuple[tuple[int, int], dict[Entry, str]] | None = None
        self._records: list[tuple[Entry, torch.Tensor]] = []
        self._last: _Last | None = None

    # Collections are registries, not data: copying a model must not copy its collection.
    def __deepcopy__(self, memo: dict[int, Any]) -> Collection:
        return self

    def __copy__(self) -> Collection:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (get_collection, ()) if self is _default else (Collection, ())

    def __repr__(self) -> str:
        return f"<regcollect.Collection with {len(self)} entries>"

    def __len__(self) -> int:
        with self._lock:
            self._cleanup()
            return len(self._entries)

    # -- registration (used by regcollect.attach and regcollect.nn) --

    def _on_death(self, _ref: object) -> None:
        # May run inside the garbage collector in any thread: only set flags here.
        self._has_dead = True
        self._plans = {}
        self._version += 1

    def _module_ref(self, module: torch.nn.Module) -> weakref.ref[torch.nn.Module]:
        return weakref.ref(module, self._on_death)

    def add_weight(
        self, module: torch.nn.Module, param: str, regularizer: Regularizer, prefix: str = ""
    ) -> Entry:
        """Register ``regularizer`` on ``module._parameters[param]``, replacing any previous one."""
        entry = Entry(
            WEIGHT, regularizer, module_ref=self._module_ref(module), param=param, prefix=prefix
        )
        return self._insert((entry.module_ref, param), entry)

    def add_tensor(self, tensor: torch.Tensor, regularizer: Regularizer, name: str) -> Entry:
        """Register ``regularizer`` on a bare tensor (held weakly) under ``name``."""
        entry = Entry(
            TENSOR,
            regularizer,
            tensor_ref=weakref.ref(tensor, self._on_death),
            explicit_name=name,
            prefix=current_prefix(),
        )
        # Keyed by id: weak references to tensors compare their referents with ==, which is
        # elementwise. A dead tensor's entry is cleaned up before its id can be reused.
        return self._insert((TENSOR, id(tensor)), entry)

    def add_activity(
        self, module: torch.nn.Module, regularizer: Regularizer, prefix: str = ""
    ) -> Entry:
        """Penalise ``module``'s output: ``regularizer(output) / batch_size`` per forward pass."""
        entry = Entry(ACTIVITY, regularizer, module_ref=self._module_ref(module), prefix=prefix)
        entry.hook_handle = module.register_forward_hook(_ActivityHook(self, entry))
        return self._insert((entry.module_ref, ":activity"), entry)

    def _insert(self, key: tuple[Any, ...], entry: Entry) -> Entry:
        with self._lock:
            self._cleanup()
            old = self._entries.pop(key, None)
            if old is not None:
                self._detach(old)
            tensor = entry.resolve()
            if tensor is not None:
                # One regularizer per parameter: a tied parameter reached through another
                # module replaces the earlier entry instead of counting twice.
                previous = self._by_tensor.get(id(tensor))
                if previous is not None and previous[0]() is tensor:
                    tied = self._entries.pop(previous[1], None)
                    if tied is not None:
                        self._detach(tied)
                self._by_tensor[id(tensor)] = (weakref.ref(tensor), key)
            entry.key = key
            self._entries[key] = entry
            self._changed()
            return entry

    def _changed(self) -> None:
        self._version += 1
        self._plans = {}

    def _detach(self, entry: Entry) -> None:
        if entry.hook_handle is not None:
            entry.hook_handle.remove()
            entry.hook_handle = None
            self._records = [(e, v) for e, v in self._records if e is not entry]

    def _discard(self, entry: Entry) -> bool:
        """Remove ``entry`` if it is still registered here (not replaced since)."""
        with self._lock:
            if self._entries.get(entry.key) is not entry:
                return False
            del self._entries[entry.key]
            self._detach(entry)
            self._changed()
            return True

    def _cleanup(self) -> None:
        if not self._has_dead:
            return
        self._has_dead = False
        dead = [key for key, entry in self._entries.items() if not entry.alive]
        for key in dead:
            self._detach(self._entries.pop(key))
        self._by_tensor = {k: v for k, v in self._by_tensor.items() if v[0]() is not None}
        self._records = [(e, v) for e, v in self._records if e.alive]
        if dead:
            self._changed()

    def remove(self, module: torch.nn.Module) -> int:
        """Remove the entries on ``module`` and its submodules; return how many."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        ids = {id(m) for m in module.modules()}
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
            self._records = []
            self._last = None
            self._consumed = self._warned_forgotten = self._warned = False
            self._changed()

    # -- names --

    def _names(self) -> dict[Entry, str]:
        with self._lock:
            self._cleanup()
            key = (self._version, _naming.version())
            if self._names_cache is not None and self._names_cache[0] == key:
                return self._names_cache[1]
            names: dict[Entry, str] = {}
            used: set[str] = set()
            for entry in self._entries.values():
                base, root = entry._base_name()
                name = base
                if name in used and root is not None:
                    name = entry.prefix + _naming.auto_name(root) + "/" + base[len(entry.prefix) :]
                k = 1
                while name in used:
                    name, k = f"{base}_{k}", k + 1
                used.add(name)
                names[entry] = entry.name = name
            self._names_cache = (key, names)
            return names

    def entries(self, scope: str | None = None) -> list[Entry]:
        """Live entries in registration order, optionally filtered by a ``scope`` regex."""
        pattern = _compile_scope(scope)
        names = self._names()
        return [e for e, n in names.items() if pattern is None or pattern.match(n)]

    # -- computing --

    def _plan(self, scope: str | None) -> _CachedPlan:
        with self._lock:
            self._cleanup()
            recent = self._plans.get(scope, [])
            names_version = None if scope is None else _naming.version()
            for cached in recent:
                if cached.version != self._version or cached.names_version != names_version:
                    continue
                # The hot path: one identity and requires_grad check per tensor, no names.
                tensors = _current_tensors(cached.locators)
                if all(map(operator.is_, tensors, cached.tensors)) and cached.flags == _flags(
                    tensors
                ):
                    if cached is not recent[0]:
                        self._plans[scope] = [cached, recent[0]]
                    return cached
            if scope is None:
                candidates = [e for e in self._entries.values() if e.kind != ACTIVITY]
            else:
                candidates = [e for e in self.entries(scope) if e.kind != ACTIVITY]
            locators = [e.locator for e in candidates]
            tensors = _current_tensors(locators)
            flags = _flags(tensors)
            chosen_entries, chosen_tensors = _choose(candidates, tensors)
            plan = Plan(
                chosen_tensors,
                [e.regularizer for e in chosen_entries],
                self._describer(chosen_entries),
            )
            cached = _CachedPlan(
                self._version,
                names_version,
                locators,
                tensors,
                flags,
                plan,
                chosen_entries,
            )
            self._plans[scope] = [cached, *recent[:1]]
            return cached

    def _describer(self, entries: list[Entry]) -> Callable[[int], str]:
        """Names ``entries[i]`` in engine error messages (resolved only on error)."""

        def describe(i: int) -> str:
            return f"entry {self._names().get(entries[i], '?')!r}"

        return describe

    def _take_records(self, scope: str | None) -> list[tuple[Entry, torch.Tensor]]:
        with self._lock:
            self._cleanup()
            if scope is None:
                taken, self._records = self._records, []
                return taken
            return self._split_records(set(self.entries(scope)))

    def _split_records(self, keep: Container[Entry]) -> list[tuple[Entry, torch.Tensor]]:
        """Take the recorded activity penalties of the entries in ``keep``; leave the rest."""
        taken = [(e, v) for e, v in self._records if e in keep]
        self._records = [(e, v) for e, v in self._records if e not in keep]
        return taken

    def _record(self, entry: Entry, value: torch.Tensor) -> None:
        self._records.append((entry, value))
        if len(self._records) > self.max_pending:
            with self._lock:
                excess = len(self._records) - self.max_pending
                if excess > 0:
                    del self._records[:excess]
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"activity penalties of more than {self.max_pending} forward passes were "
                    "recorded but never consumed by rc.loss(); the oldest are being dropped. "
                    "Add rc.loss() to the training loss, or run forward passes that need no "
                    "penalty under torch.no_grad().",
                    RegcollectWarning,
                    stacklevel=4,
                )

    def loss(self, scope: str | None = None) -> torch.Tensor:
        """Sum of every live penalty: weights plus activity penalties recorded since last call.

        A 0-dim tensor, differentiable, on the parameters' device, float32 at least;
        ``tensor(0.)`` when nothing is registered. Reads nothing back to the host.
        """
        if torch.compiler.is_compiling():
            in_scope, plan_entries, plan = self._traced_plan(scope)
            if scope is None:
                records, self._records = self._records, []
            else:
                records = self._split_records(in_scope)
        else:
            cached = self._plan(scope)
            plan_entries, plan = cached.plan_entries, cached.plan
            records = self._take_records(scope)
        result = plan()
        total = result.total
        if records:
            values = [v for _, v in records]
            if not plan_entries:
                total = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
            activity = torch.stack([v.to(device=total.device) for v in values]).sum()
            total = total + activity
        self._last = _Last(plan_entries, result.parts, records)
        self._consumed = True
        if self.check_finite and not torch.compiler.is_compiling():
            self.assert_finite(scope)
        return total

    def _traced_plan(self, scope: str | None) -> tuple[list[Entry], list[Entry], Plan]:
        """The plan, rebuilt while torch.compile traces ``loss()``: no lock, no cache.

        Returns the entries in ``scope``, the plan's entries and the plan. Dynamo turns this
        into guards on the entries and the modules' parameters and a graph of the penalty
        math, so a compiled step has no graph break here. It reruns only when the guards fail
        (an entry added or removed, a parameter replaced, frozen, moved), which is when the
        cache would rebuild too. A ``scope`` is matched against the names once, when the step
        is traced (:func:`_scope_positions`).
        """
        in_scope = list(self._entries.values())
        if scope is not None:
            if not isinstance(scope, str):
                _compile_scope(scope)  # raises the TypeError of the eager path
            found = _scope_positions(self, scope)
            if isinstance(found, str):  # an invalid regular expression
                raise ValueError(found)
            in_scope = [in_scope[i] for i in found]
        candidates = [e for e in in_scope if e.kind != ACTIVITY]
        # _current_tensors' one-line comprehension is the faster eager lookup, but dynamo
        # misreads its walrus cell ("Read uninitialized cell"): the same lookup, spelled out.
        current: list[torch.Tensor | None] = []
        for ref, name in (e.locator for e in candidates):
            owner = ref()
            if name is not None and owner is not None:
                owner = owner._parameters.get(name)
            current.append(owner)
        entries, tensors = _choose(candidates, current)
        plan = Plan(tensors, [e.regularizer for e in entries], self._describer(entries))
        return in_scope, entries, plan

    def losses(self, scope: str | None = None) -> list[torch.Tensor]:
        """One differentiable 0-dim tensor per live entry that contributes, in registration order.

        Weight entries are evaluated one by one (use :meth:`loss` in training loops); activity
        entries give the sum of the penalties recorded since the last call.
        """
        cached = self._plan(scope)
        records = self._take_records(scope)
        out: list[torch.Tensor] = []
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for i, (entry, tensor) in enumerate(zip(cached.plan_entries, cached.plan.tensors)):
            # A one-tensor plan: sharded tensors are completed exactly, as in loss().
            value = Plan([tensor], [entry.regularizer], self._describer([entry]))().total
            out.append(value)
            parts.append((value.detach().reshape(1), [i]))
        by_entry: dict[Entry, list[torch.Tensor]] = {}
        for entry, value in records:
            by_entry.setdefault(entry, []).append(value)
        out.extend(torch.stack(vs).sum() for vs in by_entry.values())
        self._last = _Last(cached.plan_entries, parts, records)
        self._consumed = True
        if self.check_finite:
            self.assert_finite(scope)
        return out

    # -- reading the last values (one device-to-host copy) --

    def _snapshot(
        self, scope: str | None = None, extra: Sequence[torch.Tensor] = ()
    ) -> tuple[list[tuple[Entry, str, float | None]], float, list[float]]:
        """Rows ``(entry, name, value or None)``, the total, and ``extra`` tensors as floats."""
        entries = self.entries(scope)
        names = self._names()
        last = self._last
        tensors: list[torch.Tensor] = [t.detach().reshape(-1) for t in extra]
        owners: list[list[Entry]] = [[] for _ in extra]
        if last is not None:
            for values, indices in last.parts:
                tensors.append(values.reshape(-1))
                owners.append([last.plan_entries[i] for i in indices])
            for entry, value in last.records:
                tensors.append(value.reshape(-1))
                owners.append([entry])
        floats = _to_host(tensors)
        extra_values = [f[0] for f in floats[: len(extra)]]
        value_of: dict[Entry, float] = {}
        if last is not None:
            for e in last.plan_entries:
                value_of[e] = 0.0
        for flat, owner in zip(floats[len(extra) :], owners[len(extra) :]):
            for e, v in zip(owner, flat):
                value_of[e] = value_of.get(e, 0.0) + v
        rows = [(e, names[e], value_of.get(e)) for e in entries]
        total = sum(v for _, _, v in rows if v is not None)
        return rows, total, extra_values

    def assert_finite(self, scope: str | None = None) -> None:
        """Raise ``FloatingPointError`` naming every entry whose last penalty is NaN or inf.

        Reads the values of the last :meth:`loss` (one device-to-host copy). Weights that are
        NaN or infinite always make ``loss()`` non-finite; this turns that into an error that
        says where. ``Collection(check_finite=True)`` runs it after every ``loss()``.
        """
        rows, _, _ = self._snapshot(scope)
        bad = [
            (name, value)
            for _, name, value in rows
            if value is not None and not math.isfinite(value)
        ]
        if bad:
            listed = ", ".join(f"{name!r} ({value})" for name, value in bad)
            raise FloatingPointError(
                f"non-finite regularization penalty in {len(bad)} entr"
                f"{'y' if len(bad) == 1 else 'ies'}: {listed}; the weights (or, for activity "
                "entries, the layer outputs) hold NaN or inf values"
            )

    def penalties(self, scope: str | None = None) -> dict[str, float]:
        """``{entry name: penalty, ..., "total": sum}`` from the last :meth:`loss` call."""
        rows, total, _ = self._snapshot(scope)
        out = {name: value for _, name, value in rows if value is not None}
        out["total"] = total
        return out

    def summary(
        self,
        loss: torch.Tensor | float | None = None,
        scope: str | None = None,
        *,
        tablefmt: str = "simple",
        file: Any = None,
    ) -> str:
        """Print and return the table of penalties; see :func:`regcollect.summary`."""
        from .summary import render  # the renderer sits a layer above; imported on use

        return render(self, loss=loss, scope=scope, tablefmt=tablefmt, file=file)


_live: weakref.WeakSet[Collection] = weakref.WeakSet()


def _forgotten_loss_check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step hook: warn once per collection whose penalties never reach a loss."""
    for coll in list(_live):
        if coll._consumed or coll._warned_forgotten or not coll._entries:
            continue
        with coll._lock:
            entries = list(coll._entries.values())
            tensors = _current_tensors([e.locator for e in entries])
            pending = bool(coll._records)
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


def _dead_ref() -> None:
    """Stands in for the weak reference of an entry that regularizes no tensor."""
    return None


@torch.compiler.assume_constant_result
def _scope_positions(coll: Collection, scope: str) -> tuple[int, ...] | str:
    """Positions, among ``coll``'s entries, of those whose names ``scope`` matches.

    While torch.compile traces, this runs once, outside the graph, and its result is a
    constant of the graph: names and regular expressions are Python work that dynamo would
    otherwise break the graph for. The entries themselves are guarded, so adding or removing
    one retraces; a name that changes later without that (a module renamed) is not seen.
    An invalid regular expression gives the error message, for the caller to raise: raised
    here, it would reach the user wrapped in a dynamo error.
    """
    try:
        keep = set(coll.entries(scope))
    except ValueError as exc:
        return str(exc)
    return tuple(i for i, e in enumerate(coll._entries.values()) if e in keep)


def _choose(
    candidates: list[Entry], tensors: list[torch.Tensor | None]
) -> tuple[list[Entry], list[torch.Tensor]]:
    """The entries whose tensor exists and trains, in registration order, each tensor once.

    A parameter reached through two entries (tied after registration) counts once: the later
    registration wins, as re-registering does.
    """
    chosen: dict[int, int] = {}
    for i, t in enumerate(tensors):
        if t is not None and t.requires_grad:
            chosen[id(t)] = i
    order = sorted(chosen.values())
    return [candidates[i] for i in order], [tensors[i] for i in order]  # type: ignore[misc]


def _current_tensors(locators: list[tuple[Any, str | None]]) -> list[torch.Tensor | None]:
    """The tensors entries point at now: ``module._parameters[name]``, or a tensor's referent."""
    return [
        (m._parameters.get(n) if (m := ref()) is not None else None) if n is not None else ref()
        for ref, n in locators
    ]


# What a plan depends on besides identity: module.to(dtype) and .cuda() change a parameter's
# dtype and device in place, keeping the same object. attrgetter keeps this check in C.
_meta = operator.attrgetter("requires_grad", "dtype", "device")
_exists = functools.partial(operator.is_not, None)


def _flags(tensors: list[torch.Tensor | None]) -> list[tuple[Any, ...]]:
    """``(requires_grad, dtype, device)`` of each tensor that exists (None entries skipped)."""
    return list(map(_meta, filter(_exists, tensors)))


def _to_host(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """Each tensor as a list of floats, with one device-to-host copy per device."""
    out: list[list[float]] = [[] for _ in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].to(torch.float64) for i in indices]).tolist()
        pos = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[pos : pos + n]
            pos += n
    return out


class _ActivityHook:
    """Forward hook recording ``regularizer(output) / batch_size`` while gradients are on.

    Pickled or deep-copied, it becomes inert: a copy re-registers through its layer (see
    :mod:`regcollect.nn`), never by smuggling a reference to this collection along.
    """

    def __init__(self, collection: Collection, entry: Entry) -> None:
        self.collection = weakref.ref(collection)
        self.entry = weakref.ref(entry)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        collection, entry = self.collection(), self.entry()
        if collection is None or entry is None:
            return
        try:
            value = activity_penalty(entry.regularizer, module, output)
        except (TypeError, ValueError) as exc:
            name = collection._names().get(entry, "?")
            raise type(exc)(f"entry {name!r}: {exc}") from exc
        collection._record(entry, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert_hook_factory, ())


def _inert_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
    """What an activity hook becomes in a pickled or copied model: nothing."""


def _inert_hook_factory() -> Any:
    return _inert_hook


def activity_penalty(
    regularizer: Regularizer, module: torch.nn.Module, output: Any
) -> torch.Tensor:
    """Keras semantics: ``regularizer(output) / batch_size``, 0 for an empty batch.

    The output is the first tensor of a tuple (RNNs return ``(output, state)``); a packed
    sequence contributes its data. Batch-first unless the module says ``batch_first=False``.
    """
    batch_dim = 0
    if isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        batch = int(output.batch_sizes[0]) if output.batch_sizes.numel() else 0
        output = output.data
    else:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"activity regularizer on {type(module).__name__} expects a tensor output, "
                f"got {type(output).__name__}"
            )
        if getattr(module, "batch_first", True) is False and output.dim() == 3:
            batch_dim = 1
        batch = output.shape[batch_dim] if output.dim() > 0 else 1
    if batch == 0 or output.numel() == 0:
        return torch.zeros((), dtype=accumulation_dtype(output.dtype), device=output.device)
    return regularizer(output) / batch


class Handle:
    """What registration calls return: ``.remove()`` undoes exactly what the call added.

    Also a context manager, removing its entries on exit.
    """

    def __init__(self, pairs: Sequence[tuple[Collection, Entry]] = ()) -> None:
        self._pairs = list(pairs)

    @property
    def entries(self) -> list[Entry]:
        """The entries this call added that are still registered, with their names resolved."""
        out = []
        for collection, entry in self._pairs:
            if entry in collection._names():
                out.append(entry)
        return out

    def remove(self) -> None:
        for collection, entry in self._pairs:
            collection._discard(entry)
        self._pairs = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"<regcollect.Handle of {len(self._pairs)} entries>"


_default = Collection()


def get_collection() -> Collection:
    """The default collection, used when no ``collection=`` is given."""
    return _default


def loss(scope: str | None = None, *, collection: Collection | None = None) -> torch.Tensor:
    """Total regularization loss of a collection (default one); see :meth:`Collection.loss`."""
    return active_collection(collection).loss(scope)


get_regularization_loss = loss


def get_regularization_losses(
    scope: str | None = None, *, collection: Collection | None = None
) -> list[torch.Tensor]:
    """One tensor per entry; see :meth:`Collection.losses`."""
    return active_collection(collection).losses(scope)


def assert_finite(scope: str | None = None, *, collection: Collection | None = None) -> None:
    """Raise ``FloatingPointError`` naming the entries whose last penalty is NaN or inf."""
    active_collection(collection).assert_finite(scope)


def penalties(
    scope: str | None = None, *, collection: Collection | None = None
) -> dict[str, float]:
    """``{name: value, ..., "total": sum}`` from the last ``loss()``, for loggers."""
    return active_collection(collection).penalties(scope)
