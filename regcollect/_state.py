"""The hooks regcollect puts into torch's process-wide hook tables, in one place.

Each is installed on first need, not at import, and can be removed:

- ``OPTIMIZER_STEP``: after every optimizer step, advance the coefficient schedules the step
  drives and warn about penalties that never reach a loss. Installed when the first entry is
  registered in a collection (``Registry``) or the first schedule is followed.
- the module-registration hook of ``regcollect._naming`` (parent links for entry names) is
  still installed at import: a model built before it was installed would be named from its
  innermost registered module instead of its root.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["GlobalHook", "OPTIMIZER_STEP"]


class GlobalHook:
    """One of torch's global hooks, calling every function added to it, installed on the
    first ``add`` and removed by ``remove``."""

    def __init__(self, register: Callable[[Callable[..., None]], Any]) -> None:
        self._register = register
        self._functions: list[Callable[..., None]] = []
        self._handle: Any = None
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def add(self, fn: Callable[..., None]) -> None:
        """Call ``fn`` from the hook from now on (once, however often it is added), and
        install the hook if it is not."""
        with self._lock:
            if fn not in self._functions:
                self._functions.append(fn)
            if self._handle is None:
                self._handle = self._register(self._call)

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
