"""Activity penalties: the forward hook, Keras's ``/ batch_size`` rule, and pending records.

A forward pass made with gradients enabled records ``regularizer(output) / batch_size``. The
record is part of every read of the collection (``loss()``, ``losses()``,
``get_regularization_losses()``) whose scope covers its entry, until its pass is done; reading
has no side effect, as Keras's ``model.losses``. The rules follow the training loop:

* the pass is done when it is backpropagated (its output's gradient was computed): the
  record leaves then, counted by the ``loss()`` that reached the weights. If no read took it
  before, the penalty never reached the weights: it is dropped, freeing its graph, and the
  next ``loss()`` warns, naming the entry;
* a record already read gives way to the next pass of the same layer (a validation loop run
  with gradients on prints each pass once, never a growing sum);
* a record whose output carries no gradient (a frozen layer fed constants) or that a
  compiled step made has no backward to tell its end: it leaves at the next optimizer step
  after a read (or with the next pass of its layer);
* a pass made while its layer was in eval mode is dropped by a ``loss()`` taken after the
  layer is back in training mode (a validation pass never leaks into a training step);
* what pending records hold is bounded in count and in bytes of the outputs whose graphs
  they keep alive; past either bound the oldest are dropped, with one warning;
* a forward pass run inside a backward pass (non-reentrant activation checkpointing
  recomputing) records nothing: its pass was recorded when it first ran; reentrant
  checkpointing runs the first forward without gradients, so it records only inside the
  backward, where no loss can take it: that raises an error naming the entry.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ._checks import RegcollectWarning
from ._entries import Entry
from ._torch_compat import is_compiling
from .regularizers import Regularizer, accumulation_dtype

__all__ = ["ActivityHook", "Pending", "Record", "activity_penalty", "inert_hook"]


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


class Record:
    """One forward pass's activity penalty, pending until its pass is done."""

    __slots__ = ("__weakref__", "entry", "hooked", "nbytes", "read", "training", "value")

    def __init__(
        self, entry: Entry, value: torch.Tensor, training: bool, nbytes: int, hooked: bool
    ) -> None:
        self.entry, self.value, self.training, self.nbytes = entry, value, training, nbytes
        self.hooked = hooked  # its output's backward releases it
        self.read = False


class _BackpropHook:
    """Tensor hook on a recorded output: its gradient was computed, so the pass was
    backpropagated. Holds only weak references: the output must not keep its record alive."""

    __slots__ = ("pending", "record")

    def __init__(self, pending: Pending, record: Record) -> None:
        self.pending, self.record = weakref.ref(pending), weakref.ref(record)

    def __call__(self, grad: torch.Tensor) -> None:
        pending, record = self.pending(), self.record()
        if pending is not None and record is not None:
            pending.backpropagated(record)


class Pending:
    """The recorded activity penalties of one collection, and their lifecycle."""

    def __init__(self, describe: Callable[[Entry], str], max_count: int, max_bytes: int) -> None:
        self.describe = describe
        self.max_count, self.max_bytes = max_count, max_bytes
        self._lock = threading.RLock()
        self._records: list[Record] = []
        self._bytes = 0
        self._warned_bound = False
        # Entries whose pass was backpropagated before any loss() took its penalty; the next
        # loss() warns once about the first of them.
        self._missed: Entry | None = None
        self._warned_missed = False

    def __len__(self) -> int:
        return len(self._records)

    def __bool__(self) -> bool:
        return bool(self._records)

    @property
    def missed(self) -> Entry | None:
        """An entry whose pass was backpropagated before any read took its penalty (until
        the next read warns about it)."""
        return self._missed

    @property
    def nbytes(self) -> int:
        """Bytes of the outputs whose graphs the pending records keep alive."""
        return self._bytes

    def add(self, entry: Entry, value: torch.Tensor, training: bool, output: torch.Tensor) -> None:
        if is_compiling():
            # Traced into the graph: no lock, no tensor hook (a compiled step cannot tell
            # when its pass is backpropagated); the bounds are checked by the next eager call.
            # An earlier pass of this layer that a read already counted gives way, as below.
            self._records = [r for r in self._records if not (r.read and r.entry is entry)]
            self._records.append(Record(entry, value, training, 0, hooked=False))
            return
        hooked = output.requires_grad
        record = Record(entry, value, training, output.nbytes if hooked else 0, hooked)
        if hooked:
            output.register_hook(_BackpropHook(self, record))
        with self._lock:
            # An earlier pass of this layer that a read already counted gives way.
            if any(r.read and r.entry is entry for r in self._records):
                self.discard(lambda r: not (r.read and r.entry is entry))
            self._records.append(record)
            self._bytes += record.nbytes
            if len(self._records) <= self.max_count and self._bytes <= self.max_bytes:
                return
            while self._records and (
                len(self._records) > self.max_count or self._bytes > self.max_bytes
            ):
                self._bytes -= self._records.pop(0).nbytes
            warn, self._warned_bound = not self._warned_bound, True
        if warn:
            warnings.warn(
                f"activity penalties of more than {self.max_count} forward passes or "
                f"{self.max_bytes / 2**20:.0f} MiB of outputs were recorded but never consumed "
                f"by rc.loss() (last: {self.describe(entry)}); the oldest are being dropped. "
                "Add rc.loss() to the training loss, or run forward passes that need no "
                "penalty under torch.no_grad().",
                RegcollectWarning,
                stacklevel=5,
            )

    def backpropagated(self, record: Record) -> None:
        with self._lock:
            for i, r in enumerate(self._records):
                if r is record:
                    del self._records[i]
                    self._bytes -= r.nbytes
                    if not r.read and self._missed is None:
                        self._missed = r.entry
                    return

    def take(self, keep: Callable[[Entry], bool] | None) -> list[Record]:
        """The records ``keep`` selects (all when None), oldest first, marked as read; they
        stay pending until their pass is backpropagated (see the module's rules).

        Records made in eval mode whose layer is back in training mode are dropped instead.
        """
        with self._lock:
            missed, self._missed = self._missed, None
            taken: list[Record] = []
            left: list[Record] = []
            for r in self._records:
                if keep is not None and not keep(r.entry):
                    left.append(r)
                    continue
                module = r.entry.module
                if module is None or not (r.training or not module.training):
                    self._bytes -= r.nbytes  # a dead layer's, or a validation pass's
                    continue
                r.read = True
                taken.append(r)
                left.append(r)
            self._records = left
        if missed is not None and not self._warned_missed:
            self._warned_missed = True
            warnings.warn(
                f"the activity penalty of {self.describe(missed)} was recorded in a forward "
                "pass that was backpropagated before any rc.loss() took it, so it never "
                "reached the weights and was dropped. With gradient accumulation, add "
                "rc.loss() to each micro-batch's loss.",
                RegcollectWarning,
                stacklevel=5,
            )
        return taken

    def take_traced(self, keep: frozenset[int] | None) -> list[Record]:
        """``take`` while torch.compile traces: no lock, no mode check, no warning."""
        taken = [r for r in self._records if keep is None or id(r.entry) in keep]
        for r in taken:
            r.read = True
        return taken

    def end_of_step(self) -> None:
        """An optimizer step ran: the records no backward releases (no gradient, or made in
        a compiled step) that a read counted are done."""
        with self._lock:
            if any(r.read and not r.hooked for r in self._records):
                self.discard(lambda r: r.hooked or not r.read)

    def discard(self, keep: Callable[[Record], bool]) -> None:
        """Drop the records ``keep`` rejects (a removed entry's, a dead module's, a pass that
        is done)."""
        with self._lock:
            kept = [r for r in self._records if keep(r)]
            self._bytes = sum(r.nbytes for r in kept)
            self._records = kept

    def clear(self) -> None:
        with self._lock:
            self._records, self._bytes = [], 0
            self._missed, self._warned_missed, self._warned_bound = None, False, False


class Recorder(Protocol):
    """What an activity hook reports to: a collection."""

    pending: Pending

    def describe(self, entry: Entry) -> str: ...


class ActivityHook:
    """Forward hook recording ``regularizer(output) / batch_size`` while gradients are on.

    Pickled or deep-copied, it becomes inert: a copy re-registers through its layer (see
    ``regcollect.nn``), never by smuggling a reference to a collection along.
    """

    def __init__(self, owner: Recorder, entry: Entry) -> None:
        self.owner = weakref.ref(owner)
        self.entry = weakref.ref(entry)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        owner, entry = self.owner(), self.entry()
        if owner is None or entry is None:
            return
        node = None if is_compiling() else torch._C._current_autograd_node()
        if node is not None and type(node).__name__ == "CheckpointFunctionBackward":
            raise RuntimeError(
                f"activity regularizer on {owner.describe(entry)} inside "
                "torch.utils.checkpoint(..., use_reentrant=True): the forward pass runs "
                "without gradients and again inside backward, where no loss can take its "
                "penalty. Use checkpoint(..., use_reentrant=False)."
            )
        try:
            tensor, batch = _watched_output(module, output)
            value = activity_penalty(entry.regularizer, tensor, batch)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner.describe(entry)}: {exc}") from exc
        if node is not None:
            # A forward pass inside a backward: non-reentrant checkpointing recomputing. The
            # penalty is computed (the recomputation must save what the forward saved) but
            # not recorded: the pass was recorded when it first ran.
            return
        owner.pending.add(entry, value, module.training, tensor)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert_hook_factory, ())


def inert_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
    """What an activity hook becomes in a pickled or copied model: nothing."""


def _inert_hook_factory() -> Any:
    return inert_hook
