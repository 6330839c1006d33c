"""A regularizer's coefficient: a non-negative number or a schedule, one rule for both, and
how a schedule is written into (and read from) a regularizer's config.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from .._checks import CoefficientTypeError, shown
from ..schedules import (
    CosineSchedule,
    FunctionSchedule,
    LinearSchedule,
    Schedule,
    check_coefficient,
)

__all__ = [
    "Coefficient",
    "CoefficientArg",
    "check_coefficient",
    "coefficient",
    "deserialize_schedule",
    "scale",
    "serialize_schedule",
]

_BUILT_IN: dict[str, type[Schedule]] = {
    "LinearSchedule": LinearSchedule,
    "CosineSchedule": CosineSchedule,
}


def serialize_schedule(schedule: Schedule) -> dict[str, Any]:
    """``{"class_name", "config"}`` of a built-in schedule; a function one cannot be."""
    name = type(schedule).__name__
    if _BUILT_IN.get(name) is not type(schedule):
        raise NotImplementedError(
            f"{schedule!r} cannot be serialised; only {sorted(_BUILT_IN)} can"
        )
    return {"class_name": name, "config": schedule.get_config()}


def deserialize_schedule(config: dict[str, Any]) -> Schedule:
    """Inverse of ``serialize_schedule``; only the built-in schedule names resolve."""
    name = config.get("class_name")
    cls = _BUILT_IN.get(name) if isinstance(name, str) else None
    inner = config.get("config", {})
    if cls is None or not isinstance(inner, dict) or set(config) - {"class_name", "config"}:
        raise ValueError(
            f'a schedule must be {{"class_name": one of {sorted(_BUILT_IN)}, "config": '
            f"{{...}}}}, got {shown(config)}"
        )
    try:
        return cls(**inner)
    except TypeError as exc:
        raise ValueError(f"bad config for schedule {name!r}: {shown(inner)} ({exc})") from None


Coefficient = float | Schedule
# What a coefficient argument accepts: a number, a schedule, or a function of the step.
CoefficientArg = float | Schedule | Callable[[int], float]


def coefficient(name: str, value: object) -> Coefficient:
    """A regularizer coefficient: a non-negative finite real number, or a schedule over
    optimizer steps (a ``regcollect.schedules.Schedule``, its serialised dict, or a callable
    ``fn(step) -> float``)."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, dict):
        return deserialize_schedule(value)
    if callable(value) and not isinstance(value, (numbers.Number, torch.Tensor)):
        # A callable coefficient is a schedule fn(step) -> float. A function of the weights
        # given here by mistake (rc.l2(lambda w: ...)) fails on a step number: say so now,
        # not at the first loss() with "'int' object has no attribute ...".
        try:
            float(value(0))
        except Exception as exc:
            raise ValueError(
                f"{name} must be a number or a schedule fn(step) -> float; the callable given "
                f"raised {type(exc).__name__} on step 0 ({exc}). For a penalty computed by your "
                "own function of the weights, pass the function as the regularizer itself "
                "(kernel_regularizer=fn, or rc.regularizers.get(fn))"
            ) from None
        return FunctionSchedule(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CoefficientTypeError(
            f"{name} must be a non-negative finite real number (int or float), a schedule "
            "(rc.schedules.warmup(...), a Schedule) or a callable fn(step) -> float; got "
            f"{shown(value)} of type {type(value).__name__}"
        )
    return check_coefficient(name, value)


def scale(coef: Coefficient, x: torch.Tensor) -> float | torch.Tensor:
    """``coef`` as a factor for tensors on ``x``'s device: the float itself, or the schedule's
    current value as a 0-dim tensor there (updated in place as the steps go by)."""
    return coef if type(coef) is float else coef.tensor(x.device)  # type: ignore[union-attr]
