"""``GroupLasso`` (Yuan and Lin, "Model selection and estimation in regression with grouped
variables", JRSS B 2006; for pruning, Wen et al., "Learning structured sparsity in deep neural
networks", NeurIPS 2016): ``factor * sum_g ||x_g||_2`` over slices of ``x``, which drives whole
rows or filters to zero so that they can be removed.

Its value, its batched evaluation and its step math live here: coupled, the (sub)gradient
``grad += factor * w_g / ||w_g||``; decoupled, the proximal step after the update, block
soft-thresholding ``w_g *= max(0, 1 - lr * factor / ||w_g||)``, which sets whole groups exactly
to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from .step import Scalar, scaled

__all__ = ["GroupLasso", "group_lasso", "group_norms"]

# Group lasso stacks tensors of one shape up to this size (one node for many small kernels).
_STACK_MAX_BYTES = 64 * 1024


def group_norms(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The L2 norm of each slice of ``x`` along ``axis`` (in range), in float32 at least."""
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return torch.linalg.vector_norm(rows, 2, dim=1, dtype=accumulation_dtype(x.dtype))


def _broadcast(p: torch.Tensor, norms: torch.Tensor, axis: int) -> torch.Tensor:
    """Each group's norm, shaped to broadcast over ``p`` (never below the smallest normal)."""
    shape = [1] * p.dim()
    shape[axis % p.dim()] = -1
    return norms.reshape(shape).clamp_min(torch.finfo(norms.dtype).tiny)


@dataclass(frozen=True)
class _GroupTerm(Term):
    """``coef * sum_g ||w_g||`` along ``axis``; parameters of one axis share a group."""

    axis: int

    def shardable(self, cut: frozenset[int], ndim: int) -> bool:
        """Each group is a slice along ``axis``: whole on one rank when only ``axis`` is cut."""
        return cut <= {self.axis % ndim} if ndim else not cut

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
        for p, grad in zip(params, grads):
            axis = self.axis % p.dim()
            direction = p / _broadcast(p, group_norms(p, axis), axis)  # 0 for a zero group
            if grad_scale is not None:
                direction.mul_(grad_scale.to(direction.device))
            grad.add_(direction, alpha=sign * coef)

    def after_(
        self,
        coef: float,
        lr: Scalar,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        for p in params:
            axis = self.axis % p.dim()
            t = scaled(lr * coef, keep, p.device)
            p.mul_((1.0 - t / _broadcast(p, group_norms(p, axis), axis)).clamp_min(0.0))


class GroupLasso(Regularizer):
    """``factor * sum_g ||x_g||_2``: the L2 norms of the slices ``x_g`` of ``x`` along
    ``axis``, summed.

    With ``axis=0`` (the default) the groups are the rows of a ``Linear`` weight (one per
    output unit) or the filters of a convolution kernel (``(out, in, *k)``): the penalty
    drives whole units to exactly zero, and in ``attach_optimizer(..., decoupled=True)``
    its proximal step (block soft-thresholding) sets them to zero exactly. ``axis=1``
    groups input units or channels. On a vector each element is a group: L1. A transposed
    convolution's weight is ``(in, out / groups, *k)``: there ``axis=1`` groups the output
    channels.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        axis: The dimension whose slices are the groups.

    Raises:
        ValueError: ``axis`` is not an int; a negative, NaN or infinite ``factor``; when
            called, an ``axis`` out of the tensor's range.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> float(GroupLasso(0.1)(x))  # 0.1 * (5 + 0)
        0.5
    """

    @keywords_checked
    def __init__(self, factor: CoefficientArg = 0.01, axis: int = 0) -> None:
        self.factor = coefficient("factor", factor)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int, got {axis!r} of type {type(axis).__name__}")
        self.axis = axis

    def _axis(self, x: torch.Tensor) -> int:
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"GroupLasso axis={self.axis} is out of range for a tensor of shape "
                f"{tuple(x.shape)} (expected {-max(x.dim(), 1)} <= axis < {max(x.dim(), 1)})"
            )
        return self.axis % x.dim()

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each group (slice along ``axis``), in float32 at least.

        Args:
            x: The tensor.

        Returns:
            A 1-D tensor with one norm per group.

        Raises:
            ValueError: ``axis`` is out of ``x``'s range.
        """
        return group_norms(x, self._axis(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "GroupLasso")
        self._axis(x)
        if x.numel() == 0:
            return zero_like(x) + 0.0 * x.sum()
        return scale(self.factor, x) * self.norms(x).sum()

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "axis": self.axis}


class _GroupLassoKernel(Kernel):
    """The group lasso's terms (its block soft threshold in the step), its axis check, its
    batched value."""

    def terms(self, reg: Any) -> tuple[tuple[Term, Coefficient], ...]:
        return ((_GroupTerm(reg.axis), reg.factor),)

    def check(self, reg: Any, x: torch.Tensor) -> None:
        reg._axis(x)

    def batch_key(self, reg: Any, x: torch.Tensor) -> Any:
        if x.numel() == 0 or not -x.dim() <= reg.axis < x.dim():
            return None  # called alone: the empty case, or the error naming the entry
        return (reg.factor, reg.axis % x.dim(), x.shape)

    def batch(self, xs: list[torch.Tensor], regs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        first = regs[0]
        axis = first.axis % xs[0].dim()
        acc = accumulation_dtype(xs[0].dtype)
        if xs[0].numel() * xs[0].element_size() > _STACK_MAX_BYTES:
            # Large tensors: one norm each; a stacked copy would cost more than it saves.
            sums = torch.stack([first.norms(x).sum() for x in xs])
        else:
            stacked = torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0)
            rows = stacked.movedim(axis + 1, 1).reshape(len(xs), xs[0].shape[axis], -1)
            sums = torch.linalg.vector_norm(rows, 2, dim=2, dtype=acc).sum(dim=1)
        values = scale(first.factor, xs[0]) * sums
        return values.sum(), values.detach()


register_kernel(GroupLasso, _GroupLassoKernel())


@keywords_checked
def group_lasso(factor: CoefficientArg = 0.01, axis: int = 0) -> GroupLasso:
    """``GroupLasso(factor, axis)``: ``factor * sum_g ||x_g||_2``.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        axis: The dimension whose slices are the groups (0: rows, filters; 1 for the
            output channels of a transposed convolution).

    Returns:
        The ``GroupLasso`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.group_lasso(0.1)(torch.tensor([[3.0, 4.0], [0.0, 0.0]])))
        0.5
    """
    return GroupLasso(factor, axis)
