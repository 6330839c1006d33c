"""Coefficient schedules: a regularizer coefficient that follows the optimizer steps.

Pass a schedule wherever a coefficient goes (``rc.l2(rc.schedules.warmup(1e-4, steps=1000))``).
Its step is the number of real updates of the tensors it regularizes: once per outermost
``optimizer.step()`` (a wrapper's step that steps the optimizer it holds is one update), however
many tensors it covers. A schedule several optimizers drive (a GAN's G and D, a Muon + AdamW
split) follows the one that has updated its tensors most. The value at step ``t`` is what
``loss()`` uses before the ``t``-th step (0-based) and what ``attach_optimizer`` applies in it.

The current value lives in a 0-dim tensor per device, updated in place when the step
changes: ``loss()`` reads it like any other tensor, so plans are not rebuilt, nothing is read
back to the host, and ``torch.compile`` neither breaks its graph nor recompiles as the value
moves. A schedule's step is saved with the optimizers that drive it (in their
``state_dict()``) and restored by their ``load_state_dict()``; see ``resume``.

Every coefficient a regularizer takes is a number (``check_coefficient``) or a schedule, one
rule for both (``regcollect._coefficients``).

Examples:
    >>> import regcollect as rc
    >>> s = rc.schedules.linear(0.0, 1e-3, steps=10)
    >>> s.set_step(5); float(s)
    0.0005
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from . import _locks
from ._checks import keywords_checked, shown

__all__ = [
    "CosineSchedule",
    "FunctionSchedule",
    "LinearSchedule",
    "Schedule",
    "check_coefficient",
    "cosine",
    "linear",
    "resume",
    "warmup",
]


def check_coefficient(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a non-negative finite real number, else raise.

    ``bool`` is rejected although it is an ``int``: ``l2(True)`` is almost certainly a bug.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a non-negative finite real number (int or float), "
            f"got {shown(value)} of type {type(value).__name__}"
        )
    try:
        result = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        result = math.inf
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be a non-negative finite real number, got {shown(value)}")
    return result


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {shown(value)}")
    return int(value)


class Schedule:
    """Base class: ``value(step) -> float``, a non-negative coefficient for each step.

    Subclasses implement ``value`` and ``get_config``. ``float(schedule)`` is the value at
    the current step. The optimizer steps that update the tensors a regularizer with this
    schedule covers advance it, once per ``optimizer.step()``.

    Examples:
        >>> import regcollect as rc
        >>> class Halving(rc.schedules.Schedule):
        ...     def value(self, step):
        ...         return 0.1 * 0.5 ** step
        >>> schedule = Halving()
        >>> schedule.set_step(2)
        >>> float(schedule)
        0.025
    """

    def __init__(self) -> None:
        self._step = 0
        self._tensors: dict[torch.device, torch.Tensor] = {}
        self._lock = _locks.Lock()

    def value(self, step: int) -> float:
        """The coefficient at ``step``.

        Args:
            step: The number of optimizer steps taken.

        Returns:
            The coefficient (checked where it is used: non-negative and finite).

        Raises:
            NotImplementedError: The subclass does not implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement value(step)")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``rc.serialize``.

        Returns:
            A JSON-safe dict.

        Raises:
            NotImplementedError: The subclass does not implement it (it cannot be saved).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_config() to be serialised"
        )

    @property
    def step(self) -> int:
        """The number of optimizer steps this schedule has followed."""
        return self._step

    def current(self) -> float:
        """The coefficient at the current step, checked.

        Returns:
            ``value(step)``.

        Raises:
            ValueError: The value is negative, NaN or infinite.
        """
        return check_coefficient(
            f"the value of {self!r} at step {self._step}", self.value(self._step)
        )

    def __float__(self) -> float:
        return self.current()

    def set_step(self, step: int) -> None:
        """Move to ``step`` (resuming), updating the coefficient tensors in place.

        Args:
            step: The number of optimizer steps taken (an int >= 0).
        """
        self._step = _count("step", step, 0)
        value = self.current()
        with torch.no_grad():
            for tensor in self._tensors.values():
                tensor.fill_(value)

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The current value as a 0-dim tensor on ``device``, the same object every call.

        Args:
            device: Where the tensor lives (that of the tensors it scales).

        Returns:
            A 0-dim tensor updated in place when the step changes (so compiled code and
            cached plans read the new value without rebuilding).
        """
        tensor = self._tensors.get(device)
        if tensor is None:
            dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
            with self._lock:
                tensor = self._tensors.get(device)
                if tensor is None:
                    tensor = torch.tensor(self.current(), dtype=dtype, device=device)
                    self._tensors[device] = tensor
        return tensor

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint must keep to resume the schedule.

        Returns:
            ``{"step": n}``.
        """
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``'s output.

        Args:
            state: ``{"step": n}``.

        Raises:
            ValueError: ``state`` is not such a dict.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f'load_state_dict expects {{"step": int}}, got {shown(state)}')
        self.set_step(state["step"])

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args}) [step {self._step}: {self.value(self._step):.4g}]"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tensors"], state["_lock"] = {}, None
        state.pop("_round", None)  # which optimizers drive it: this process's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = _locks.Lock()


class _Ramp(Schedule):
    """From ``start`` to ``end`` over ``steps`` steps after ``delay``; ``shape(progress)``
    maps the progress in [0, 1] to the fraction of the way done."""

    def __init__(self, start: float, end: float, steps: int, delay: int = 0) -> None:
        super().__init__()
        self.start = check_coefficient("start", start)
        self.end = check_coefficient("end", end)
        self.steps = _count("steps", steps, 1)
        self.delay = _count("delay", delay, 0)

    def shape(self, progress: float) -> float:
        raise NotImplementedError

    def value(self, step: int) -> float:
        progress = min(max(step - self.delay, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * self.shape(progress)

    def get_config(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps": self.steps, "delay": self.delay}


class LinearSchedule(_Ramp):
    """``start`` until step ``delay``, then linearly to ``end`` over ``steps`` steps, then
    ``end``: ``start + (end - start) * clip((step - delay) / steps, 0, 1)``."""

    def shape(self, progress: float) -> float:
        return progress


class CosineSchedule(_Ramp):
    """From ``start`` to ``end`` along half a cosine over ``steps`` steps after ``delay``:
    ``end + (start - end) * (1 + cos(pi * clip((step - delay) / steps, 0, 1))) / 2``."""

    def shape(self, progress: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * progress))


class FunctionSchedule(Schedule):
    """Any callable ``fn(step) -> float``; its values are checked (non-negative, finite).
    Not serialisable: it wraps code.

    Args:
        fn: The coefficient as a function of the optimizer step.

    Raises:
        TypeError: ``fn`` is not callable.

    Examples:
        >>> import regcollect as rc
        >>> reg = rc.l2(lambda step: 1e-4 * min(1.0, step / 100))   # a FunctionSchedule
        >>> reg.l2.set_step(50)
        >>> float(reg.l2)
        5e-05
    """

    def __init__(self, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionSchedule expects a callable, got {type(fn).__name__}")
        super().__init__()
        self.fn = fn

    def value(self, step: int) -> float:
        """``fn(step)``.

        Args:
            step: The number of optimizer steps taken.

        Returns:
            What ``fn`` returns.
        """
        return self.fn(step)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        try:
            now = f"{float(self.fn(self._step)):.4g}"
        except Exception:  # a repr must not fail; the value's own error comes where it is used
            now = "?"
        return f"FunctionSchedule({name}) [step {self._step}: {now}]"


def resume(optimizer: Any) -> None:
    """Restore the schedules ``optimizer`` drives from its state, now and at each later load.

    Every optimizer that updates scheduled tensors keeps their steps in its ``state_dict()``;
    its ``load_state_dict()`` restores them once regcollect knows the optimizer (it stepped
    in this process, or was attached with ``rc.attach_optimizer``). An optimizer built afresh
    to resume a run is not known yet: call this after loading its state and before the first
    ``rc.loss()``. ``RegularizedTrainer`` and Lightning's ``RegularizationLogger`` call it for
    their optimizers.

    Args:
        optimizer: The optimizer, or a wrapper that steps one (accelerate, Lightning).

    Raises:
        TypeError: ``optimizer`` is not an optimizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> def build():
        ...     schedule, coll = rc.schedules.warmup(0.1, steps=10), rc.Collection()
        ...     layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(schedule), collection=coll)
        ...     model = torch.nn.Sequential(layer)
        ...     return model, torch.optim.SGD(model.parameters(), lr=0.1), schedule, coll
        >>> model, opt, schedule, coll = build()
        >>> for _ in range(3):
        ...     (model(torch.ones(1, 2)).sum() + coll.loss()).backward()
        ...     opt.step()
        >>> state = opt.state_dict()            # a checkpoint
        >>> model, opt, schedule, coll = build()   # resuming: built afresh
        >>> opt.load_state_dict(state)
        >>> rc.schedules.resume(opt)
        >>> schedule.step
        3
    """
    from ._optim.following import resume as _resume

    _resume(optimizer)


@keywords_checked
def linear(start: float, end: float, steps: int, delay: int = 0) -> LinearSchedule:
    """``LinearSchedule``: from ``start`` to ``end`` over ``steps`` steps after ``delay``.

    Args:
        start: The value until step ``delay``.
        end: The value from step ``delay + steps`` on.
        steps: The length of the ramp, in optimizer steps.
        delay: The steps before the ramp starts.

    Returns:
        The schedule; pass it as a coefficient (``rc.l2(rc.schedules.linear(...))``).

    Raises:
        ValueError: A negative or non-finite value, ``steps`` below 1 or a negative ``delay``.

    Examples:
        >>> import regcollect as rc
        >>> s = rc.schedules.linear(1e-3, 1e-4, steps=100)
        >>> s.set_step(50)
        >>> round(float(s), 6)
        0.00055
    """
    return LinearSchedule(start, end, steps, delay)


@keywords_checked
def warmup(value: float, steps: int, delay: int = 0) -> LinearSchedule:
    """From 0 up to ``value`` over ``steps`` steps (after ``delay``), then ``value``.

    Args:
        value: The value after the warm-up.
        steps: The length of the warm-up, in optimizer steps.
        delay: Steps at 0 before the warm-up starts.

    Returns:
        A ``LinearSchedule`` from 0 to ``value``.

    Raises:
        ValueError: A negative or non-finite value, ``steps`` below 1 or a negative ``delay``.

    Examples:
        >>> import regcollect as rc
        >>> reg = rc.l2(rc.schedules.warmup(1e-4, steps=1000))
        >>> float(reg.l2)   # step 0
        0.0
    """
    return LinearSchedule(0.0, value, steps, delay)


@keywords_checked
def cosine(start: float, end: float, steps: int, delay: int = 0) -> CosineSchedule:
    """``CosineSchedule``: from ``start`` to ``end`` along half a cosine over ``steps``.

    Args:
        start: The value until step ``delay``.
        end: The value from step ``delay + steps`` on.
        steps: The length of the ramp, in optimizer steps.
        delay: The steps before the ramp starts.

    Returns:
        The schedule.

    Raises:
        ValueError: A negative or non-finite value, ``steps`` below 1 or a negative ``delay``.

    Examples:
        >>> import regcollect as rc
        >>> s = rc.schedules.cosine(1e-3, 0.0, steps=100)
        >>> s.set_step(50)
        >>> round(float(s), 6)   # half-way down the cosine
        0.0005
    """
    return CosineSchedule(start, end, steps, delay)


def __dir__() -> list[str]:
    """The public API (``__all__``): what tab completion offers, not this module's imports."""
    return sorted(__all__)
