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
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Protocol

import torch

from .. import _locks, _naming
from .._naming import drop_inert_hooks, inert_hook_factory, running_modules
from .._torch_compat import in_backward, is_compiling, is_tracing
from ..regularizers import Regularizer, accumulation_dtype
from .entries import Entry

__all__ = ["Activity", "activity_penalty"]


def _watched_output(module: torch.nn.Module, output: Any) -> tuple[torch.Tensor, int]:
    """The tensor an activity regularizer sees and its batch size.

    The first tensor of a tuple (RNNs return ``(output, state)``) or of a mapping (a Hugging
    Face ``ModelOutput``: its first field); a packed sequence contributes its data.
    Batch-first unless the module (or, for transformer layers and encoders, its first
    submodule that says) has ``batch_first=False``.
    """
    if isinstance(output, Mapping):  # a dict, or a Hugging Face ModelOutput
        output = next((v for v in output.values() if isinstance(v, torch.Tensor)), output)
    elif isinstance(output, (tuple, list)) and output:
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


class _Value:
    """One call's penalty: the value, whether the layer was in training mode, and whether the
    value's graph has been backpropagated (its step is over)."""

    __slots__ = ("__weakref__", "done", "training", "value")

    def __init__(self, value: torch.Tensor, training: bool) -> None:
        self.value, self.training, self.done = value, training, False


def _mark_done(ref: weakref.ref[_Value], grad: torch.Tensor) -> None:
    value = ref()
    if value is not None:
        value.done = True


class _Slot:
    """What one activity entry's layer recorded in the current pass (a ``_Value`` per call),
    and whether the layer has run without gradients since, in a way a reentrant checkpoint
    does (inside a pass with gradients on, or on its own after the last step was over)."""

    __slots__ = ("entry", "skipped", "values")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.values: list[_Value] = []
        self.skipped = False


# On a call stack, a call already under way when its module's hooks were placed.
CAUGHT = object()


class _Mark:
    """A hooked module: its calls under way (True for a call with gradients on), the marks of
    the modules holding it, and the slots and marks below it (itself included for slots)."""

    __slots__ = ("below", "handles", "holders", "module", "slots", "stack")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = weakref.ref(module)
        self.stack: list[object] = []
        self.holders: tuple[_Mark, ...] = ()
        self.slots: tuple[_Slot, ...] = ()
        self.below: tuple[_Mark, ...] = ()
        self.handles: list[Any] = []

    def nested(self, module: torch.nn.Module | None = None) -> bool:
        """Whether a module holding this one is running with gradients on, or (``module``
        given, eager) this module itself: it calls itself. A call of its own left open by an
        interrupt (no hook closes a call a ``KeyboardInterrupt`` leaves) is dropped."""
        if self.held_running(verify=module is not None):
            return True
        if module is None or not any(e is True or e is CAUGHT for e in self.stack):
            return False
        if sum(m is module for m in running_modules()) > 1:
            return True
        self.stack.clear()
        return False

    def held_running(self, verify: bool) -> bool:
        """Whether a module holding this one is running with gradients on (``verify``:
        looking up whether a call counted by a catch-up is still under way)."""
        for holder in self.holders:
            if True in holder.stack:
                return True
            if CAUGHT in holder.stack and (not verify or holder.running()):
                return True
        return False

    def running(self) -> bool:
        """Whether this module's call that a catch-up counted (``CAUGHT``) is still under way:
        one that started before its hooks were placed may have taken torch's path that runs
        no forward hook, so nothing else would close it."""
        module = self.module()
        if module is not None and any(m is module for m in running_modules()):
            return True
        self.stack[:] = [e for e in self.stack if e is not CAUGHT]
        return False

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
        return (inert_hook_factory, ())


class _Enter(_Hook):
    """Forward pre-hook: delimit passes (an outermost call starts one), push the call."""

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        tracker = self.tracker()
        if tracker is None:
            return
        if not _recording():
            self.mark.stack.append(False)
            return
        eager = not is_compiling()
        if eager and tracker.stale():
            tracker.catch_up(module)  # entries or the module tree changed: place the hooks
        mark = self.mark
        if not mark.nested(module if eager else None):
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
        if not is_compiling() and module is not slot.entry.module:
            raise RuntimeError(
                f"a copy of the layer of {tracker.describe(slot.entry)} made without "
                "copy.deepcopy (as nn.DataParallel makes its replicas) shares its hooks: its "
                "activity penalty would be counted as the original's. Train with "
                "DistributedDataParallel, or copy the model with copy.deepcopy."
            )
        if not torch.is_grad_enabled() or is_tracing():
            if not is_tracing():
                self._without_gradients(slot)
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
            record = _Value(value, module.training)
            if not is_compiling():
                value.register_hook(partial(_mark_done, weakref.ref(record)))
            slot.values.append(record)

    def _without_gradients(self, slot: _Slot) -> None:
        """The layer runs without gradients: inside a pass with gradients on (a reentrant
        checkpoint's first half, or a no_grad block), or on its own; then the penalties of a
        step that is over (backpropagated) go, so that none is read as this call's."""
        if not self.mark.held_running(verify=not is_compiling()):
            slot.values = [v for v in slot.values if not v.done]
        slot.skipped = True


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
        self._slots: dict[Entry, _Slot] = {}
        # Registration order, as a tuple: what a compiled loss() reads.
        self.ordered: tuple[_Slot, ...] = ()
        self._marks: dict[int, _Mark] = {}
        self._records: dict[Entry, tuple[_Record, Any]] = {}
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
            slot = _Slot(entry)
            self._slots[entry] = slot
            self.ordered = tuple(self._slots.values())
            mark = self._mark(layer)
            mark.slots = (*mark.slots, slot)
            hook = _Record(self, mark, slot)
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
        if running:
            _naming.record_tree(running[-1])
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

    def _mark(self, module: torch.nn.Module) -> _Mark:
        mark = self._marks.get(id(module))
        if mark is None or mark.module() is not module:
            mark = _Mark(module)
            drop_inert_hooks(module)
            mark.handles = [
                module.register_forward_pre_hook(_Enter(self, mark)),
                module.register_forward_hook(_Exit(self, mark), always_call=True),
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
        below: dict[int, list[_Mark]] = {key: [] for key in marks}
        inside: dict[int, list[_Slot]] = {key: [] for key in marks}
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
