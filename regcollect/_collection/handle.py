"""What registration returns: a handle that undoes exactly what its call did."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from .entries import Entry

__all__ = ["Handle"]


class _Registry(Protocol):
    def _discard(self, entry: Entry) -> bool: ...
    def _restore(self, entry: Entry) -> None: ...
    def _names(self) -> dict[Entry, str]: ...


class Handle:
    """What registration returns: ``.remove()`` undoes exactly what the call did, restoring
    the regularizers it replaced. Also a context manager, removing its entries on exit.

    Args:
        added: ``(collection, entry)`` pairs the call registered.
        on_remove: What else ``remove()`` undoes (``attach_optimizer``'s hooks).

    Examples:
        >>> import torch, regcollect as rc
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.1))
        >>> with rc.add_regularizer(layer, "weight", rc.l1(0.5)):
        ...     layer.kernel_regularizer          # replaced inside the block
        L1(l1=0.5)
        >>> layer.kernel_regularizer              # restored on exit
        L2(l2=0.1)
    """

    def __init__(
        self,
        added: Sequence[tuple[_Registry, Entry]] = (),
        on_remove: Callable[[], None] | None = None,
    ) -> None:
        self._added = list(added)
        self._on_remove = on_remove  # what a call that added no entry undoes (attach_optimizer)
        entries = [entry for _, entry in self._added]
        for entry in entries:
            entry._handles += 1
        if entries:
            weakref.finalize(self, _forget, entries)

    @classmethod
    def join(cls, handles: Sequence[Handle]) -> Handle:
        """One handle for several calls.

        Args:
            handles: The handles to combine.

        Returns:
            A handle whose ``remove()`` undoes all of them (their entries, not their
            ``on_remove`` actions).
        """
        return cls([item for h in handles for item in h._added])

    @property
    def entries(self) -> list[Entry]:
        """The entries this call added that are still registered, with their names resolved."""
        return [e for c, e in self._added if e in c._names()]

    def remove(self) -> None:
        """Undo the call: remove its entries (restoring what they replaced) and run its
        ``on_remove``. Removing twice does nothing."""
        for collection, entry in reversed(self._added):
            if collection._discard(entry):
                for old in entry._replaced:
                    collection._restore(old)
            else:
                entry._retired = True
        self._added = []
        if self._on_remove is not None:
            on_remove, self._on_remove = self._on_remove, None
            on_remove()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._added)

    def __repr__(self) -> str:
        return f"<regcollect.Handle of {len(self._added)} entries>"


def _forget(entries: list[Entry]) -> None:
    """A handle is gone: an entry no live handle holds can no longer be removed with its
    replacements restored, so it lets go of them, unless it was retired (its handle removed
    while replaced): restoring what replaced it passes through it to them."""
    for entry in entries:
        entry._handles -= 1
        if entry._handles == 0 and not entry._retired:
            entry._replaced = []


# The public path (regcollect.Handle), which pickles and reprs record, not this private module's.
Handle.__module__ = "regcollect"
