"""Activity penalties: an activity penalty belongs to the forward pass that made it.

The rule, as Keras's ``layer.losses``: ``loss()`` holds, for each layer with an activity
regularizer, ``regularizer(output) / batch_size`` of each of its calls in the most recent
forward pass made with gradients on, and reading it changes nothing. A forward pass starts
with an *outermost* call: a call of a module holding such layers (the layer itself included)
while no module holding it is running. It drops what its layers recorded before, so a layer
called k times in one pass contributes k penalties and the next pass replaces them (Keras
resets ``layer.losses`` at the start of each outermost call).

What records nothing and starts no pass: calls under ``torch.no_grad()`` or
``torch.inference_mode()``, ``torch.jit.trace`` and ``torch.export`` (they only look at the
model), and forward passes run inside a backward pass (activation checkpointing recomputing
what its forward pass already recorded). A penalty that carries no gradient (a frozen layer
fed constants) trains nothing and is left out, as a frozen weight is. Penalties recorded in
eval mode are read only while the layer is still in eval mode (a validation loss counts them,
a training loss taken before the next forward pass does not).

``checkpoint(..., use_reentrant=True)`` runs its forward pass without gradients and again
inside the backward pass, where no loss can take a penalty: that recomputation raises an error
naming the entry.

How outermost calls are known: a forward pre-hook and an ``always_call`` forward hook on each
regularized layer and on every module holding one (the parent links of
``regcollect._naming``) keep, per module, a stack of its calls under way; a call is outermost
when no holder's stack has a call with gradients on. The hooks live as long as the entries;
each is a callable object that pickles and deep-copies to a no-op, so a copied model carries
no reference to a collection.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from . import _naming
from ._entries import Entry
from ._torch_compat import in_backward, is_compiling, is_tracing
from .regularizers import Regularizer, accumulation_dtype

__all__ = ["Activity", "activity_penalty", "drop_inert_hooks", "inert_hook"]


def _watched_output(module: torch.nn.Module, output: Any) -> tuple[torch.Tensor, int]:
    """The tensor an activity regularizer sees and its batch size.

    The first tensor of a tuple (RNNs return ``(output, state)``); a packed sequence
    contributes its data. Batch-first unless the module (or, for transformer layers and
    encoders, its first submodule that says) has ``batch_first=False``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        batch = int(output.batch_sizes[0]) if output.batch_sizes.numel() else 0
        return output.data, batch
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"activity regularizer on {type(module).__name__} expects a tensor output, "
            f"got {type(output).__name__}"
        )
    batch_dim = 1 if not _batch_first(module) and output.dim() == 3 else 0
    return output, (output.shape[batch_dim] if output.dim() > 0 else 1)


def _batch_first(module: torch.nn.Module) -> bool:
    """The module's ``batch_first``, or that of the first submodule that has one: a
    ``TransformerEncoderLayer`` keeps it on its attention, a ``TransformerEncoder`` on its
    layers (sequence-first by default, as RNNs)."""
    for m in module.modules():
        flag = getattr(m, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return True


def activity_penalty(regularizer: Regularizer, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Keras semantics: ``regularizer(output) / batch_size``, 0 for an empty batch."""
    if batch == 0 or tensor.numel() == 0:
        return torch.zeros((), dtype=accumulation_dtype(tensor.dtype), device=tensor.device)
    return regularizer(tensor) / batch


class _Slot:
    """What one activity entry's layer recorded in the current pass: ``(penalty, made in
    training mode)`` per call, and whether the layer ran without gradients inside a pass with
    gradients on (the first half of a reentrant checkpoint)."""

    __slots__ = ("entry", "skipped", "values")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.values: list[tuple[torch.Tensor, bool]] = []
        self.skipped = False


class _Mark:
    """A hooked module: its calls under way (True for a call with gradients on), the marks of
    the modules holding it, and the slots and marks below it (itself included for slots)."""

    __slots__ = ("below", "handles", "holders", "module", "slots", "stack")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = weakref.ref(module)
        self.stack: list[bool] = []
        self.holders: tuple[_Mark, ...] = ()
        self.slots: tuple[_Slot, ...] = ()
        self.below: tuple[_Mark, ...] = ()
        self.handles: list[Any] = []

    def nested(self) -> bool:
        """Whether a module holding this one is running with gradients on."""
        return any(True in holder.stack for holder in self.holders)

    def start_pass(self) -> None:
        """An outermost call: its layers' earlier penalties go. No module below it can be
        running now, so their call stacks are emptied too (a call an interrupt or a compiled
        frame's exception left open, which no hook closed)."""
        for slot in self.slots:
            slot.values = []
            slot.skipped = False
        for mark in self.below:
            mark.stack.clear()


def _recording() -> bool:
    """Whether a forward pass now records penalties and delimits passes."""
    if not torch.is_grad_enabled() or is_tracing():
        return False
    return is_compiling() or not in_backward()


class _Hook:
    """Base of the hooks: a weak reference to the tracker (a collection dropped leaves its
    hooks inert), and no-ops once pickled or copied."""

    def __init__(self, tracker: Activity, mark: _Mark) -> None:
        self.tracker = weakref.ref(tracker)
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert_hook_factory, ())


class _Enter(_Hook):
    """Forward pre-hook: delimit passes (an outermost call starts one), push the call."""

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        tracker = self.tracker()
        if tracker is None:
            return
        if not _recording():
            self.mark.stack.append(False)
            return
        if not is_compiling():
            tracker.refresh()  # the module tree changed since the hooks were placed
        mark = self.mark
        if not mark.nested():
            mark.start_pass()
        mark.stack.append(True)


class _Exit(_Hook):
    """Forward hook (``always_call``): the call is over. A hook placed while the module was
    already running finds no call of its own to close, and closes none."""

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self.mark.stack
        if stack and self.tracker() is not None:
            stack.pop()


class _Record(_Hook):
    """Forward hook on a regularized layer: record ``regularizer(output) / batch_size``."""

    def __init__(self, tracker: Activity, mark: _Mark, slot: _Slot) -> None:
        super().__init__(tracker, mark)
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        tracker = self.tracker()
        if tracker is None:
            return
        slot = self.slot
        if not torch.is_grad_enabled() or is_tracing():
            if not is_tracing() and self.mark.nested():
                slot.skipped = True  # inside a pass with gradients on: remembered
            return
        backward = not is_compiling() and in_backward()
        if backward and slot.skipped and not slot.values:
            raise RuntimeError(
                f"activity regularizer on {tracker.describe(slot.entry)} inside "
                "torch.utils.checkpoint(..., use_reentrant=True): its forward pass ran without "
                "gradients and runs again inside the backward pass, where no loss can take its "
                "penalty. Use checkpoint(..., use_reentrant=False)."
            )
        try:
            tensor, batch = _watched_output(module, output)
            # Computed inside a backward pass too: a non-reentrant checkpoint's recomputation
            # must save what its forward pass saved. Recorded only in the forward pass.
            value = activity_penalty(slot.entry.regularizer, tensor, batch)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{tracker.describe(slot.entry)}: {exc}") from exc
        if not backward and value.requires_grad:
            slot.values.append((value, module.training))


def inert_hook(*args: Any) -> None:
    """What a regcollect hook becomes in a pickled or copied model: nothing."""


def _inert_hook_factory() -> Any:
    return inert_hook


def drop_inert_hooks(module: torch.nn.Module) -> None:
    """Remove the no-ops a pickled or copied module's regcollect hooks became."""
    for hooks, extra in (
        (module._forward_hooks, (module._forward_hooks_with_kwargs,)),
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
    ):
        for key in [k for k, hook in hooks.items() if hook is inert_hook]:
            del hooks[key]
            for table in (*extra, module._forward_hooks_always_called):
                table.pop(key, None)


class Describer(Protocol):
    """What names entries in errors: the registry."""

    def describe(self, entry: Entry) -> str: ...


class Activity:
    """The activity entries of one collection: their slots and the hooks that fill them.

    Args:
        describer: Names entries in error messages.
    """

    def __init__(self, describer: Describer) -> None:
        self._describer = weakref.ref(describer)
        self._lock = threading.RLock()
        self._slots: dict[Entry, _Slot] = {}
        # Registration order, as a tuple: what a compiled loss() reads.
        self.ordered: tuple[_Slot, ...] = ()
        self._marks: dict[int, _Mark] = {}
        self._version = 0
        self._built: tuple[int, int] | None = None
        self._records: dict[Entry, Any] = {}
        _naming.listen(self)

    def __len__(self) -> int:
        return len(self._slots)

    def after_fork(self) -> None:
        """In a forked child: a new lock."""
        self._lock = threading.RLock()

    def describe(self, entry: Entry) -> str:
        describer = self._describer()
        return describer.describe(entry) if describer is not None else repr(entry.name)

    # -- entries ---------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Record ``entry``'s layer output from now on (its hooks go in now)."""
        with self._lock:
            self._slots[entry] = _Slot(entry)
            self._version += 1
            self.refresh()

    def remove(self, entries: Iterable[Entry]) -> None:
        """Stop recording ``entries`` (their hooks come out, their penalties go)."""
        with self._lock:
            changed = False
            for entry in entries:
                changed |= self._slots.pop(entry, None) is not None
            if changed:
                self._version += 1
                self.refresh()

    def clear(self) -> None:
        self.remove(list(self._slots))

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
            counted = [v for v, made_training in slot.values if made_training or not training]
            if eager and any(type(v) is not torch.Tensor for v in counted):
                counted = [v for v in counted if not _traced_value(v)]
            if counted:
                out.append((slot.entry, counted[0] if len(counted) == 1 else sum_of(counted)))
        return out

    def has_values(self) -> bool:
        """Whether some layer recorded a penalty in its current pass."""
        return any(slot.values for slot in self.ordered)

    # -- the hooks -------------------------------------------------------------------------

    def linked(self, parent: torch.nn.Module, child: torch.nn.Module) -> None:
        """``child`` is being registered in ``parent`` (called by ``regcollect._naming``
        before the assignment): place the hooks the new holder needs now, before its first
        call. Not while torch.compile traces (a model scope records its tree then): hooks
        placed inside a trace would change the modules dynamo is looking at; the next eager
        call places them."""
        if id(child) in self._marks and not is_compiling():
            with self._lock:
                self.refresh(link=(parent, child))

    def refresh(self, link: tuple[torch.nn.Module, torch.nn.Module] | None = None) -> None:
        """Place the hooks on the regularized layers and the modules holding them, if the
        entries or the module tree changed since they were placed."""
        key = (self._version, _naming.version())
        if key == self._built and link is None:
            return
        with self._lock:
            if key == self._built and link is None:
                return
            self._rebuild(link)
            self._built = key

    def _rebuild(self, link: tuple[torch.nn.Module, torch.nn.Module] | None) -> None:
        slots = {e: s for e, s in self._slots.items() if e.module is not None}
        holders: dict[int, list[torch.nn.Module]] = {}
        modules: dict[int, torch.nn.Module] = {}
        for entry in slots:
            layer = entry.module
            assert layer is not None
            for module in (layer, *_naming.holders(layer, link)):
                if id(module) not in modules:
                    modules[id(module)] = module
                    holders[id(module)] = _naming.holders(module, link)
        marks: dict[int, _Mark] = {}
        for key, module in modules.items():
            mark = self._marks.get(key)
            if mark is None or mark.module() is not module:
                mark = _Mark(module)
                drop_inert_hooks(module)
                mark.handles = [
                    module.register_forward_pre_hook(_Enter(self, mark)),
                    module.register_forward_hook(_Exit(self, mark), always_call=True),
                ]
            marks[key] = mark
        for key, mark in self._marks.items():
            if marks.get(key) is not mark:
                for handle in mark.handles:
                    handle.remove()
        below: dict[int, list[_Mark]] = {key: [] for key in marks}
        inside: dict[int, list[_Slot]] = {key: [] for key in marks}
        for key, mark in marks.items():
            mark.holders = tuple(marks[id(h)] for h in holders[key] if id(h) in marks)
            for holder in holders[key]:
                below[id(holder)].append(mark)
        for entry, slot in slots.items():
            layer = entry.module
            assert layer is not None
            for key in (id(layer), *map(id, holders[id(layer)])):
                inside[key].append(slot)
        for key, mark in marks.items():
            mark.below, mark.slots = tuple(below[key]), tuple(inside[key])
        self._marks = marks
        records = {}
        for entry, slot in slots.items():
            layer = entry.module
            assert layer is not None
            old = self._records.get(entry)
            if old is not None and old[0].mark is marks[id(layer)] and old[0].slot is slot:
                records[entry] = old
                continue
            if old is not None:
                old[1].remove()
            hook = _Record(self, marks[id(layer)], slot)
            records[entry] = (hook, layer.register_forward_hook(hook))
        for entry, (_, handle) in self._records.items():
            if entry not in records:
                handle.remove()
        self._records = records
        self.ordered = tuple(slots.values())


def _traced_value(value: torch.Tensor) -> bool:
    """Whether ``value`` is a fake tensor a trace left behind: torch.export on torch 2.6, which
    has no ``is_exporting`` flag to tell it from torch.compile, applies the hooks' writes with
    the values it traced."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(value))


def sum_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a layer's penalties in one pass (one device and dtype: one layer's)."""
    return torch.stack(values).sum()
