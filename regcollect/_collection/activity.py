"""Activity penalties: an activity penalty belongs to the forward pass that made it.

The rule, as Keras's ``layer.losses``: ``loss()`` holds, for each layer with an activity
regularizer, ``regularizer(output) / batch_size`` of each of its calls in the most recent
forward pass made with gradients on, and reading it changes nothing. A forward pass starts
with an *outermost* call: a call of a module holding such layers (the layer itself included)
while no module holding it is running. It drops what its layers recorded before, so a layer
called k times in one pass contributes k penalties and the next pass replaces them (Keras
resets ``layer.losses`` at the start of each outermost call).

What records nothing and starts no pass: calls under ``torch.no_grad()`` or
``torch.inference_mode()``, ``torch.jit.trace``, ``torch.export`` and ``torch.fx`` tracing
(they only look at the model), and forward passes run inside a backward pass (activation
checkpointing recomputing what its forward pass already recorded). A penalty that carries no
gradient (a frozen layer fed constants) trains nothing and is left out, as a frozen weight is.
A penalty is read only while its layer is in the mode it was recorded in (a validation loss in
eval mode never reads the training pass's, a training loss never a validation pass's).

``checkpoint(..., use_reentrant=True)`` runs its forward pass without gradients and again
inside the backward pass, where no loss can take a penalty: that recomputation raises an error
naming the entry.

How outermost calls are known: a forward pre-hook and an ``always_call`` forward hook on each
regularized layer and on every module holding one (the parent links of
``regcollect._naming``) keep, per module, a stack of its calls under way; a call is outermost
when no holder's stack has a call with gradients on (and no call of the module itself is under
way: a module calling itself). The hooks on the holders are placed at the first call after the
entries or the module tree changed, for all of them at once; a call that finds them out of date
looks up which modules are running in this thread (their ``Module.__call__`` frames), learns
their tree (a deep-copied or unpickled model, whose links nobody recorded) and counts their
calls from there. The hooks live as long as the entries; each is a callable object that
pickles and deep-copies to a no-op, so a copied model carries no reference to a collection.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .. import _locks, _naming
from .._naming import drop_inert_hooks, running_modules
from .._torch_compat import is_compiling
from .entries import Entry
from .hooks import CAUGHT, Enter, Exit, Mark, Record, Slot, activity_penalty

__all__ = ["Activity", "activity_penalty"]


class Describer(Protocol):
    """What names entries in errors: the registry."""

    def describe(self, entry: Entry) -> str: ...


class Activity:
    """The activity entries of one collection: their slots and the hooks that fill them.

    Registering an entry places the hooks on its layer at once; those on the modules holding
    it are placed for all entries together at the next call of a hooked module, or when asked
    (``refresh``), so that registering n layers costs n, not n squared.

    Args:
        describer: Names entries in error messages.
    """

    def __init__(self, describer: Describer) -> None:
        self._describer = weakref.ref(describer)
        self._lock = _locks.RLock()
        self._slots: dict[Entry, Slot] = {}
        # Registration order, as a tuple: what a compiled loss() reads.
        self.ordered: tuple[Slot, ...] = ()
        self._marks: dict[int, Mark] = {}
        self._records: dict[Entry, tuple[Record, Any]] = {}
        self._version = 0
        self._built: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def describe(self, entry: Entry) -> str:
        describer = self._describer()
        return describer.describe(entry) if describer is not None else repr(entry.name)

    # -- entries ---------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Record ``entry``'s layer output from now on: the layer's own hooks go in now, its
        holders' at the next call."""
        layer = entry.module
        assert layer is not None
        with self._lock:
            slot = Slot(entry)
            self._slots[entry] = slot
            self.ordered = tuple(self._slots.values())
            mark = self._mark(layer)
            mark.slots = (*mark.slots, slot)
            hook = Record(self, mark, slot)
            self._records[entry] = (hook, layer.register_forward_hook(hook))
            self._version += 1

    def remove(self, entries: Iterable[Entry]) -> None:
        """Stop recording ``entries`` (their hooks come out, their penalties go)."""
        with self._lock:
            changed = False
            for entry in entries:
                slot = self._slots.pop(entry, None)
                if slot is None:
                    continue
                changed = True
                hook, handle = self._records.pop(entry)
                handle.remove()
                mark = hook.mark
                mark.slots = tuple(s for s in mark.slots if s is not slot)
                if not mark.slots:  # the layer holds no other entry: its hooks go now too
                    for h in mark.handles:
                        h.remove()
                    self._marks.pop(id(mark.module()), None)
            if changed:
                self.ordered = tuple(self._slots.values())
                self._version += 1

    def clear(self) -> None:
        self.remove(list(self._slots))
        self.refresh()

    # -- reading ---------------------------------------------------------------------------

    def read(self, keep: frozenset[int] | None) -> list[tuple[Entry, torch.Tensor]]:
        """``(entry, penalty of its layer's calls in the current pass)`` for the entries in
        ``keep`` (ids; all when None) that have one, in registration order. Pure: nothing is
        taken away."""
        out: list[tuple[Entry, torch.Tensor]] = []
        eager = not is_compiling()
        for slot in self.ordered:
            if not slot.values or (keep is not None and id(slot.entry) not in keep):
                continue
            module = slot.entry.module
            if module is None:
                continue
            training = module.training
            counted = [v.value for v in slot.values if v.training == training]
            if eager and any(type(v) is not torch.Tensor for v in counted):
                counted = [v for v in counted if not _traced_value(v)]
            if counted:
                out.append((slot.entry, counted[0] if len(counted) == 1 else sum_of(counted)))
        return out

    # -- the hooks -------------------------------------------------------------------------

    def stale(self) -> bool:
        """Whether the entries or the module tree changed since the hooks were placed."""
        return (self._version, _naming.version()) != self._built

    def catch_up(self, module: torch.nn.Module) -> None:
        """Called from the pre-hook of ``module`` when the hooks are out of date: learn the
        tree of the modules running now (a copied model's links were never recorded), place
        the hooks, and count the calls under way of the modules that were not hooked when
        they started (their forward hooks, placed now, will close them)."""
        running = running_modules()
        _naming.learn_model(running)
        self.refresh()
        seen = {id(module)}
        for m in reversed(running):  # outermost first: it starts the pass its hook missed
            mark = self._marks.get(id(m))
            if mark is not None and id(m) not in seen and not mark.stack:
                if not mark.nested():
                    mark.start_pass()
                mark.stack.append(CAUGHT)
            seen.add(id(m))

    def refresh(self) -> None:
        """Place the hooks on the modules holding the regularized layers, if the entries or
        the module tree changed since they were placed."""
        if not self.stale():
            return
        with self._lock:
            key = (self._version, _naming.version())
            if key != self._built:
                self._rebuild()
                self._built = key

    def _mark(self, module: torch.nn.Module) -> Mark:
        mark = self._marks.get(id(module))
        if mark is None or mark.module() is not module:
            mark = Mark(module)
            drop_inert_hooks(module)
            mark.handles = [
                module.register_forward_pre_hook(Enter(self, mark)),
                module.register_forward_hook(Exit(self, mark), always_call=True),
            ]
            self._marks[id(module)] = mark
        return mark

    def _rebuild(self) -> None:
        layers = {e: e.module for e in self._slots if e.module is not None}
        holders: dict[int, list[torch.nn.Module]] = {}
        modules: dict[int, torch.nn.Module] = {}
        for layer in layers.values():
            assert layer is not None
            for module in (layer, *_naming.holders(layer)):
                if id(module) not in modules:
                    modules[id(module)] = module
                    holders[id(module)] = _naming.holders(module)
        old = self._marks
        self._marks = {k: m for k, m in old.items() if k in modules and m.module() is modules[k]}
        for module in modules.values():
            self._mark(module)
        for key, mark in old.items():
            if self._marks.get(key) is not mark:
                for handle in mark.handles:
                    handle.remove()
        marks = self._marks
        below: dict[int, list[Mark]] = {key: [] for key in marks}
        inside: dict[int, list[Slot]] = {key: [] for key in marks}
        for key, mark in marks.items():
            mark.holders = tuple(marks[id(h)] for h in holders[key] if id(h) in marks)
            for holder in holders[key]:
                below[id(holder)].append(mark)
        for entry, layer in layers.items():
            assert layer is not None
            for key in (id(layer), *map(id, holders[id(layer)])):
                inside[key].append(self._slots[entry])
        for key, mark in marks.items():
            mark.below, mark.slots = tuple(below[key]), tuple(inside[key])
        for entry, layer in layers.items():
            hook = self._records[entry][0]
            hook.mark = marks[id(layer)]


def _traced_value(value: torch.Tensor) -> bool:
    """Whether ``value`` is a fake tensor a trace left behind: torch.export on torch 2.6, which
    has no ``is_exporting`` flag to tell it from torch.compile, applies the hooks' writes with
    the values it traced."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(value))


def sum_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a layer's penalties in one pass (one device and dtype: one layer's)."""
    return torch.stack(values).sum()
