"""The hooks behind activity penalties: per module, its calls under way (``Mark``); per
activity entry, the penalties of its layer's calls in the current pass (``Slot``); and the
three hooks that keep them (``Enter``, ``Exit``, ``Record``). The rule they implement is
in ``regcollect._collection.activity``, which places them.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from functools import partial
from typing import Any, Protocol

import torch

from .._naming import inert_hook_factory, running_modules
from .._torch_compat import in_backward, is_compiling, is_tracing
from ..regularizers import Regularizer, accumulation_dtype
from .entries import Entry

__all__ = ["CAUGHT", "Enter", "Exit", "Mark", "Record", "Slot", "Tracker", "activity_penalty"]


class Tracker(Protocol):
    """What the hooks ask of the collection's activity tracker (``Activity``)."""

    def stale(self) -> bool: ...

    def catch_up(self, module: torch.nn.Module) -> None: ...

    def describe(self, entry: Entry) -> str: ...


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


class Value:
    """One call's penalty: the value, whether the layer was in training mode, and whether the
    value's graph has been backpropagated (its step is over)."""

    __slots__ = ("__weakref__", "done", "training", "value")

    def __init__(self, value: torch.Tensor, training: bool) -> None:
        self.value, self.training, self.done = value, training, False


def _mark_done(ref: weakref.ref[Value], grad: torch.Tensor) -> None:
    value = ref()
    if value is not None:
        value.done = True


class Slot:
    """What one activity entry's layer recorded in the current pass (a ``Value`` per call),
    and whether the layer has run without gradients since, in a way a reentrant checkpoint
    does (inside a pass with gradients on, or on its own after the last step was over)."""

    __slots__ = ("entry", "skipped", "values")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.values: list[Value] = []
        self.skipped = False


# On a call stack, a call already under way when its module's hooks were placed.
CAUGHT = object()


class Mark:
    """A hooked module: its calls under way (True for a call with gradients on), the marks of
    the modules holding it, and the slots and marks below it (itself included for slots)."""

    __slots__ = ("below", "handles", "holders", "module", "slots", "stack")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = weakref.ref(module)
        self.stack: list[object] = []
        self.holders: tuple[Mark, ...] = ()
        self.slots: tuple[Slot, ...] = ()
        self.below: tuple[Mark, ...] = ()
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


class Hook:
    """Base of the hooks: a weak reference to the tracker (a collection dropped leaves its
    hooks inert), and no-ops once pickled or copied."""

    def __init__(self, tracker: Tracker, mark: Mark) -> None:
        self.tracker = weakref.ref(tracker)
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (inert_hook_factory, ())


class Enter(Hook):
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


class Exit(Hook):
    """Forward hook (``always_call``): the call is over. A hook placed while the module was
    already running finds no call of its own to close, and closes none."""

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self.mark.stack
        if stack and self.tracker() is not None:
            stack.pop()


class Record(Hook):
    """Forward hook on a regularized layer: record ``regularizer(output) / batch_size``."""

    def __init__(self, tracker: Tracker, mark: Mark, slot: Slot) -> None:
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
            record = Value(value, module.training)
            if not is_compiling():
                value.register_hook(partial(_mark_done, weakref.ref(record)))
            slot.values.append(record)

    def _without_gradients(self, slot: Slot) -> None:
        """The layer runs without gradients: inside a pass with gradients on (a reentrant
        checkpoint's first half, or a no_grad block), or on its own; then the penalties of a
        step that is over (backpropagated) go, so that none is read as this call's."""
        if not self.mark.held_running(verify=not is_compiling()):
            slot.values = [v for v in slot.values if not v.done]
        slot.skipped = True
