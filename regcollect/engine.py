"""Computes many penalties at once.

A :class:`Plan` is built once from ``(tensor, regularizer)`` pairs and evaluated every training
step. Regularizers that are sums of L1/L2 terms (:meth:`Regularizer.terms`) are split into their
terms and grouped by ``(kind, coefficient, device, dtype)``; each group is a single autograd node
whose forward is one ``torch._foreach_norm`` and whose backward is one or two ``torch._foreach_*``
calls, accumulating in float32 at least. Other regularizers (orthogonal, custom) are called on
their tensor one by one. The per-call Python cost is proportional to the number of groups, not
the number of tensors, and nothing here reads a value back to the host.

This module knows nothing of modules, names or collections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .regularizers import Regularizer, accumulation_dtype

__all__ = ["Plan", "Result", "group_penalty"]


class _GroupPenalty(torch.autograd.Function):
    """``total = coef * sum_i ||x_i||_p^p`` for p in {1, 2}, with per-tensor values on the side."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, kind: str, coef: float, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(xs[0].dtype)
        norms = torch.stack(torch._foreach_norm(xs, 1 if kind == "l1" else 2, dtype=acc))
        values = coef * (norms * norms if kind == "l2" else norms)
        ctx.kind, ctx.coef = kind, coef
        ctx.save_for_backward(*xs)
        ctx.mark_non_differentiable(values)
        return values.sum(), values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        xs = ctx.saved_tensors
        if ctx.kind == "l2":
            # d/dx c*||x||^2 = 2c x; the 0-dim factor keeps the gradient in x's dtype.
            grads = torch._foreach_mul(xs, grad_total * (2.0 * ctx.coef))
        else:
            grads = torch._foreach_sign(xs)
            torch._foreach_mul_(grads, grad_total * ctx.coef)
        return (None, None, *grads)


def group_penalty(
    kind: str, coef: float, tensors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(total, per_tensor_values)`` for tensors sharing one device and dtype.

    ``kind`` is ``"l1"`` (``coef * sum(abs(x))``) or ``"l2"`` (``coef * sum(x**2)``).
    Only ``total`` carries gradients.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f'kind must be "l1" or "l2", got {kind!r}')
    total, values = _GroupPenalty.apply(kind, coef, *tensors)
    return total, values


@dataclass
class Result:
    """One evaluation of a plan.

    ``total`` is differentiable. ``parts`` is a list of ``(values, indices)``: detached 1-D
    tensors of penalty values and, for each value, the index of the tensor it belongs to (a
    tensor with an L1L2 regularizer appears in two parts). Reading them costs one
    device-to-host copy per device, done only when someone asks (a summary).
    """

    total: torch.Tensor
    parts: list[tuple[torch.Tensor, list[int]]]


class Plan:
    """A reusable grouping of ``(tensor, regularizer)`` pairs; call it to get a :class:`Result`.

    >>> w = torch.ones(2, 2, requires_grad=True)
    >>> from regcollect.regularizers import L2, L1L2
    >>> plan = Plan([w, w[0]], [L2(0.5), L1L2(1.0, 0.0)])
    >>> float(plan().total)   # 0.5 * 4 + 1.0 * 2
    4.0
    """

    def __init__(self, tensors: Sequence[torch.Tensor], regularizers: Sequence[Regularizer]):
        if len(tensors) != len(regularizers):
            raise ValueError(
                f"tensors and regularizers must have the same length, "
                f"got {len(tensors)} and {len(regularizers)}"
            )
        self.tensors = list(tensors)
        self.regularizers = list(regularizers)
        groups: dict[tuple[str, float, torch.device, torch.dtype], list[int]] = {}
        self.fallback: list[int] = []
        for i, (x, reg) in enumerate(zip(self.tensors, self.regularizers)):
            terms = reg.terms() if x.is_floating_point() and _foreach_ok(x) else None
            if terms is None:
                self.fallback.append(i)
                continue
            for kind, coef in terms:
                if coef:
                    groups.setdefault((kind, coef, x.device, x.dtype), []).append(i)
        self.groups = [
            (kind, coef, idx, [self.tensors[i] for i in idx])
            for (kind, coef, _, _), idx in groups.items()
        ]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.dtype = torch.float32
        for x in self.tensors:
            self.dtype = torch.promote_types(self.dtype, accumulation_dtype(x.dtype))

    def __len__(self) -> int:
        return len(self.tensors)

    def __call__(self) -> Result:
        total: torch.Tensor | None = None
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for kind, coef, indices, tensors in self.groups:
            group_total, values = group_penalty(kind, coef, tensors)
            parts.append((values, indices))
            total = _add(total, group_total, self.device, self.dtype)
        for i in self.fallback:
            value = self.regularizers[i](self.tensors[i])
            parts.append((value.detach().reshape(1), [i]))
            total = _add(total, value, self.device, self.dtype)
        if total is None:
            total = torch.zeros((), dtype=self.dtype, device=self.device)
        return Result(total, parts)


def _foreach_ok(x: torch.Tensor) -> bool:
    # Tensor subclasses (DTensor and friends) take the per-tensor path unless they opt in.
    return type(x) in (torch.Tensor, torch.nn.Parameter)


def _add(
    total: torch.Tensor | None, value: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if value.device != device or value.dtype != dtype:
        value = value.to(device=device, dtype=dtype, non_blocking=True)
    return value if total is None else total + value
