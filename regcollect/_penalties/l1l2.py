"""``L1``, ``L2`` and ``L1L2``: their values, and their parts as the engine and the step see
them.

A part ``coef * sum(|x|**p)`` (p = 1 or 2) is computed for many tensors at once by the grouped
kernels (``regcollect._kernels``). Attached to an optimizer, L2 is ``weight_decay``: coupled
``grad += 2 c w``, decoupled ``w *= 1 - lr * 2 c`` before the update (AdamW); L1 is coupled
``grad += c sign(w)`` and decoupled its proximal step after the update, the soft threshold
``w = sign(w) * max(|w| - lr * c, 0)``, which sets weights exactly to zero.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import keywords_checked
from .base import (
    Coefficient,
    Regularizer,
    Term,
    accumulation_dtype,
    check_tensor,
    coefficient,
    scale,
    zero_like,
)
from .coefficients import CoefficientArg
from .kernel import Kernel, register_kernel
from .step import Scalar, add_coupled_, by_device_and_dtype, chunks, on_device, scaled

__all__ = ["L1", "L1L2", "L1_TERM", "L2", "L2_TERM"]


class _L1Term(Term):
    """``coef * sum(|x|)``."""

    p = 1
    local = True

    def coupled_(
        self,
        coef: float,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        where: list[Any],
        *,
        sign: float,
        grad_scale: torch.Tensor | None,
    ) -> None:
        for _, (ps, gs) in by_device_and_dtype(params, grads):
            for part, grad in chunks(ps, gs):
                add_coupled_(grad, list(torch._foreach_sign(part)), sign * coef, grad_scale)

    def after_(
        self,
        coef: float,
        lr: Scalar,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """The soft threshold ``w -= clamp(w, -t, t)`` with ``t = lr * coef``: exactly 0 where
        ``|w| <= t``."""
        for device, (bucket,) in by_device_and_dtype(params):
            t = scaled(lr * coef, keep, device)
            if isinstance(t, torch.Tensor):  # a tensor learning rate or a skip flag: per tensor
                for p in bucket:
                    tp = t.to(p.dtype)
                    p.sub_(p.clamp(-tp, tp))
                continue
            for (part,) in chunks(bucket):  # one temporary per chunk
                shrink = torch._foreach_clamp_max(part, t)
                torch._foreach_clamp_min_(shrink, -t)
                torch._foreach_sub_(part, shrink)
                del shrink


class _L2Term(Term):
    """``coef * sum(x**2)``."""

    p = 2
    local = True

    def coupled_(
        self,
        coef: float,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        where: list[Any],
        *,
        sign: float,
        grad_scale: torch.Tensor | None,
    ) -> None:
        for device, (ps, gs) in by_device_and_dtype(params, grads):
            factor = on_device(grad_scale, device)
            if factor is None:  # in place: no temporary at all
                torch._foreach_add_(gs, ps, alpha=sign * 2.0 * coef)
                continue
            for part, grad in chunks(ps, gs):
                add_coupled_(grad, list(torch._foreach_mul(part, factor)), sign * 2.0 * coef, None)

    def before_(
        self,
        coef: float,
        lr: Scalar,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """``w *= 1 - lr * 2 * coef`` (AdamW's decay)."""
        for device, (bucket,) in by_device_and_dtype(params):
            torch._foreach_mul_(bucket, 1.0 - scaled(lr * 2.0 * coef, keep, device))  # type: ignore[arg-type]


L1_TERM = _L1Term()
L2_TERM = _L2Term()


def _abs_sum(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum(dtype=accumulation_dtype(x.dtype))


def _square_sum(x: torch.Tensor) -> torch.Tensor:
    # Upcast before squaring: a float16 weight of 300 squares to inf in float16.
    x = x.to(accumulation_dtype(x.dtype))
    return (x * x).sum()


class L1(Regularizer):
    """``l1 * sum(abs(x))``.

    Args:
        l1: The coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> float(L1(0.01)(torch.ones(5, 5)))
        0.25
    """

    @keywords_checked
    def __init__(self, l1: CoefficientArg = 0.01) -> None:
        self.l1 = coefficient("l1", l1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L1")
        return scale(self.l1, x) * _abs_sum(x)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(x**2)`` (Keras scaling; ``SGD(weight_decay=wd)`` equals ``L2(wd / 2)``).

    The equality holds for parameters the data loss reaches: the optimizer skips a parameter
    whose ``.grad`` is None, while ``loss()`` reaches every regularized one (see the
    weight-decay migration guide).

    Args:
        l2: The coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> round(float(L2(0.01)(torch.full((2, 2), 3.0))), 6)
        0.36
    """

    @keywords_checked
    def __init__(self, l2: CoefficientArg = 0.01) -> None:
        self.l2 = coefficient("l2", l2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L2")
        return scale(self.l2, x) * _square_sum(x)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


class L1L2(Regularizer):
    """``l1 * sum(abs(x)) + l2 * sum(x**2)``; both default to 0 as in Keras's class.

    Args:
        l1: The L1 coefficient (a float >= 0 or a schedule).
        l2: The L2 coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> float(L1L2(l1=0.5, l2=0.25)(torch.tensor([2.0])))  # 0.5*2 + 0.25*4
        2.0
    """

    @keywords_checked
    def __init__(self, l1: CoefficientArg = 0.0, l2: CoefficientArg = 0.0) -> None:
        self.l1 = coefficient("l1", l1)
        self.l2 = coefficient("l2", l2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L1L2")
        result = zero_like(x)
        if self.l1:  # a schedule always counts: it may be zero now, not later
            result = result + scale(self.l1, x) * _abs_sum(x)
        if self.l2:
            result = result + scale(self.l2, x) * _square_sum(x)
        return result

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


class _PowersKernel(Kernel):
    """L1, L2, L1L2: sums of p-norm powers, which the grouped kernels compute."""

    def terms(self, reg: Any) -> tuple[tuple[Term, Coefficient], ...]:
        if isinstance(reg, L1L2):
            return ((L1_TERM, reg.l1), (L2_TERM, reg.l2))
        if isinstance(reg, L1):
            return ((L1_TERM, reg.l1),)
        return ((L2_TERM, reg.l2),)


for _cls in (L1, L2, L1L2):
    register_kernel(_cls, _PowersKernel())
