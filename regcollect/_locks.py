"""Locks that a forked child gets new: ``Lock()`` and ``RLock()`` behave as ``threading``'s.

A DataLoader worker forked while another thread of the parent holds one of regcollect's locks
(inside ``rc.loss()`` or a registration) inherits it held, by a thread that does not exist in
the child: the first ``rc.loss()`` or module built there would wait forever. Every lock made
here is renewed in the child right after the fork (``os.register_at_fork``), as torch does
for its own state. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["Lock", "RLock"]

_ALL: weakref.WeakSet[_ForkSafe] = weakref.WeakSet()


class _ForkSafe:
    """A lock, renewed in a forked child."""

    __slots__ = ("__weakref__", "_inner", "_make")

    def __init__(self, make: Any) -> None:
        self._make = make
        self._inner = make()
        _ALL.add(self)

    def __enter__(self) -> bool:
        return bool(self._inner.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._inner.acquire(blocking, timeout))

    def release(self) -> None:
        self._inner.release()

    def _renew(self) -> None:
        self._inner = self._make()


def Lock() -> _ForkSafe:
    """A ``threading.Lock`` that a forked child gets new."""
    return _ForkSafe(threading.Lock)


def RLock() -> _ForkSafe:
    """A ``threading.RLock`` that a forked child gets new."""
    return _ForkSafe(threading.RLock)


def _after_fork_in_child() -> None:
    for lock in list(_ALL):
        lock._renew()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
