"""Everything regcollect keeps for the whole process, in one place.

The hooks it puts into torch's process-wide hook tables, each installed on first need (never
at import); the optimizer-step ones are taken out when the need ends, when no live collection
holds an entry (the last handle removed, the last model deleted:
``regcollect._collection.guards.release``), the next need installing them again:

- ``OPTIMIZER_STEP_PRE`` and ``OPTIMIZER_STEP``: around every optimizer step, tell the steps
  that another step runs (nested) from real updates, advance the coefficient schedules a real
  update drives, and (after) warn about penalties that never reach a loss. Installed when the
  first entry is registered in a collection or the first schedule is followed.
- ``MODULE_REGISTRATION``: parent links between modules, for entry names. Installed when the
  first module is tracked (it holds an entry) or a model is handed to regcollect; the modules
  that exist by then are recorded once, in one pass over the live objects.

And the tables: ``NAMING`` (the parent links, Keras-style names), ``FOLLOWING`` (which
schedules which optimizers drive), ``COLLECTIONS`` (the live collections, the default one),
``SCOPES`` (the ``rc.scope`` stack of the current context), ``REGULARIZER_CLASSES`` (the
names ``serialize``/``deserialize`` resolve) and ``STASHED`` (penalty gradients waiting for an
engine in the backward pass under way). This module imports nothing of regcollect.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from . import _locks

__all__ = [
    "COLLECTIONS",
    "FOLLOWING",
    "GlobalHook",
    "MODULE_REGISTRATION",
    "NAMING",
    "OPTIMIZER_STEP",
    "OPTIMIZER_STEP_PRE",
    "REGULARIZER_CLASSES",
    "SCOPES",
    "STASHED",
    "remove_hooks",
]


class GlobalHook:
    """One of torch's global hooks, calling every function added to it, installed on the
    first ``add`` and removed by ``remove``."""

    def __init__(self, register: Callable[[Callable[..., None]], Any]) -> None:
        self._register = register
        self._functions: list[Callable[..., None]] = []
        self._handle: Any = None
        self._lock = _locks.Lock()

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def add(self, fn: Callable[..., None]) -> bool:
        """Call ``fn`` from the hook from now on (once, however often it is added), and
        install the hook if it is not. Returns whether this call installed it."""
        with self._lock:
            if fn not in self._functions:
                self._functions.append(fn)
            if self._handle is not None:
                return False
            self._handle = self._register(self._call)
            return True

    def discard(self, fn: Callable[..., None]) -> None:
        """Stop calling ``fn``; with nothing left to call, take the hook out of torch's
        table (the next ``add`` installs it again)."""
        with self._lock:
            if fn in self._functions:
                self._functions.remove(fn)
            if not self._functions and self._handle is not None:
                self._handle.remove()
                self._handle = None

    def remove(self) -> None:
        """Take the hook out of torch's table; the next ``add`` installs it again."""
        with self._lock:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            self._functions.clear()

    def _call(self, *args: Any) -> None:
        for fn in list(self._functions):
            fn(*args)


OPTIMIZER_STEP = GlobalHook(register_optimizer_step_post_hook)
OPTIMIZER_STEP_PRE = GlobalHook(register_optimizer_step_pre_hook)
MODULE_REGISTRATION = GlobalHook(torch.nn.modules.module.register_module_module_registration_hook)


def remove_hooks() -> None:
    """Take every hook regcollect installed out of torch's tables."""
    OPTIMIZER_STEP.remove()
    OPTIMIZER_STEP_PRE.remove()
    MODULE_REGISTRATION.remove()


@dataclass
class _Naming:
    """Parent links (weak: a record never keeps a module alive) and automatic names."""

    lock: Any = field(default_factory=_locks.Lock)
    parents: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[Any, str]]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    auto_names: weakref.WeakKeyDictionary[torch.nn.Module, str] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    counters: defaultdict[str, itertools.count[int]] = field(
        default_factory=lambda: defaultdict(itertools.count)
    )
    # Modules that hold entries, and their ancestors: only links that involve one of them can
    # change an entry's name or which model subtree it belongs to.
    tracked: weakref.WeakSet[torch.nn.Module] = field(default_factory=weakref.WeakSet)
    version: int = 0


@dataclass
class _Following:
    """Schedules in use, each with the entries that use it (weakly), and per optimizer the
    schedules its step drives (with the key they were computed for)."""

    users: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    driven: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, list[Any]]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    version: int = 0
    # Per thread, the optimizer steps running now (outermost first).
    steps: threading.local = field(default_factory=threading.local)


@dataclass
class _Collections:
    """The live collections (weakly), by uid for unpickling, and the default one."""

    live: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    by_uid: weakref.WeakValueDictionary[str, Any] = field(
        default_factory=weakref.WeakValueDictionary
    )
    default: Any = None
    warned_lost: bool = False


NAMING = _Naming()
FOLLOWING = _Following()
COLLECTIONS = _Collections()
# The rc.scope / compat.v1 name-scope frames of the current context (thread, task).
SCOPES: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "regcollect_scopes", default=()
)
REGULARIZER_CLASSES: dict[str, Any] = {}
# Parameters held in parts across ranks whose penalty gradient waits, in the backward pass
# under way, for the engine to take it (regcollect._held).
STASHED: list[Any] = []
