"""What registration returns: a handle that undoes exactly what its call did, from the undo
records its call made (``Undo``): the entry added and the records of what it replaced."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from .entries import Entry

__all__ = ["Handle", "Undo", "restorable"]


class Undo:
    """What one registration did: the ``entry`` it added, and the records of the registrations
    it replaced (``replaced``), which removing it restores.

    ``retired``: its handle was removed while a later registration had replaced it (restoring
    it then passes through it, to what it replaced). ``handles`` counts the live handles
    holding the record: once none is, nothing can restore what it replaced, so it lets go of
    those (a registration repeated every step would otherwise keep every earlier one alive).
    """

    __slots__ = ("entry", "handles", "replaced", "retired")

    def __init__(self, entry: Entry, replaced: list[Undo] | None = None) -> None:
        self.entry = entry
        self.replaced: list[Undo] = replaced or []
        self.retired = False
        self.handles = 0


def restorable(replaced: list[Undo], entry: Entry) -> list[Undo]:
    """What removing ``entry`` restores of what it ``replaced``. An equal regularizer
    registered again over one whose handle is held is set-up code run twice (a notebook
    cell), not an override: removing the new handle must not bring the first registration
    back, only what that one had replaced. A layer's own declaration (rc.nn, no handle held)
    is always restored."""
    out: list[Undo] = []
    for r in replaced:
        repeated = r.handles > 0 and r.entry.regularizer == entry.regularizer
        out.extend(r.replaced if repeated else [r])
    return out


class _Registry(Protocol):
    def _discard(self, entry: Entry) -> Undo | None: ...
    def _restore(self, record: Undo) -> None: ...
    def settle(self) -> None: ...
    def _names(self) -> dict[Entry, str]: ...


class Handle:
    """What registration returns: ``.remove()`` undoes exactly what the call did, restoring
    the regularizers it replaced. Also a context manager, removing its entries on exit.

    Args:
        added: ``(registry, undo record)`` pairs of what the call registered.
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
        added: Sequence[tuple[_Registry, Undo]] = (),
        on_remove: Callable[[], None] | None = None,
    ) -> None:
        self._added = list(added)
        self._on_remove = on_remove  # what a call that added no entry undoes (attach_optimizer)
        records = [record for _, record in self._added]
        for record in records:
            record.handles += 1
        if records:
            weakref.finalize(self, _forget, records)

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
        return [r.entry for c, r in self._added if r.entry in c._names()]

    def remove(self) -> None:
        """Undo the call: remove its entries (restoring what they replaced) and run its
        ``on_remove``. Removing twice does nothing."""
        for registry, record in reversed(self._added):
            if registry._discard(record.entry) is record:
                for old in record.replaced:
                    registry._restore(old)
            else:
                record.retired = True
        registries = {id(r): r for r, _ in self._added}
        self._added = []
        for registry in registries.values():
            registry.settle()
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


def _forget(records: list[Undo]) -> None:
    """A handle is gone: a record no live handle holds can no longer be undone with its
    replacements restored, so it lets go of them, unless it was retired (its handle removed
    while replaced): restoring what replaced it passes through it to them."""
    for record in records:
        record.handles -= 1
        if record.handles == 0 and not record.retired:
            record.replaced = []


# The public path (regcollect.Handle), which pickles and reprs record, not this private module's.
Handle.__module__ = "regcollect"
