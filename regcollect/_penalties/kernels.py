"""The grouped penalty kernels: one autograd node for many tensors of one p-norm power.

``group_penalty(p, coef, tensors)`` returns ``(total, per_tensor_values)`` of
``coef * sum(|x|**p)`` (p = 1 or 2, a penalty's ``Term.p``) over tensors sharing a device and
dtype. Forward is one ``torch._foreach_norm`` (float32 accumulation at least; large CPU tensors
reduced in blocks, see ``_cpu_powers``), backward one or two ``torch._foreach_*`` calls. On the
CPU, small tensors of one shape can be stacked into one tensor instead (``_StackedPenalty``).
Nothing here reads a value back to the host. No penalty is named here: a penalty module hands
its ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._torch_compat import is_compiling
from .base import accumulation_dtype

__all__ = ["difference_penalty", "group_forward", "group_penalty", "group_value"]


def group_forward(
    p: int, coef: float | torch.Tensor, xs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(xs[0].dtype)
    # A group shares one device: only CPU groups look for large tensors (no per-tensor work
    # on other devices, every step).
    cpu = xs[0].device.type == "cpu"
    large = [i for i, x in enumerate(xs) if x.numel() > _EXACT_MIN] if cpu else []
    if large and not is_compiling():
        powers = _cpu_powers(p, xs, large, acc)
    else:
        norms = torch.stack(torch._foreach_norm(xs, p, dtype=acc))
        powers = norms * norms if p == 2 else norms
    values = coef * powers
    return values.sum(), values


# CPU reductions of more elements than this are computed exactly (see _cpu_powers).
_EXACT_MIN = 16384
_ROW = 1024


def _cpu_powers(
    p: int, xs: tuple[torch.Tensor, ...], large: list[int], acc: torch.dtype
) -> torch.Tensor:
    """``sum(|x|)`` (p = 1) or ``sum(x**2)`` (p = 2) of each tensor, to float precision on the CPU.

    The CPU ``_foreach_norm`` accumulates each tensor in one float32 sum, whose error grows
    with its length: on a 4096x1024 weight the L2 value was off by 1.6e-4 relative and the L1
    value by 1.2e-3 (float64 reference). Tensors of more than ``_EXACT_MIN`` elements are
    reduced in blocks instead, as ``torch.sum`` does: L2 as rows of ``_ROW`` elements (one
    ``vector_norm`` per tensor, as fast as ``_foreach_norm``) whose squares are summed per
    tensor in float64 (all tensors at once: a few thousand values); L1 as ``abs().sum()``, 3x
    faster than the CPU ``_foreach_norm(ord=1)``. Both agree with float64 to about 1e-7.
    """
    if p == 1:
        exact = [x.abs().sum(dtype=acc) for x in (xs[i] for i in large)]
        powers = torch.stack(exact)
    else:
        rows, lengths = [], []
        for i in large:
            x = xs[i]
            n = x.numel()
            if n % _ROW == 0 and x.is_contiguous():  # the usual case: whole rows, no copy
                rows.append(torch.linalg.vector_norm(x.view(-1, _ROW), 2, dim=1, dtype=acc))
                lengths.append(n // _ROW)
                continue
            flat = _flat(x)
            whole = n // _ROW * _ROW
            rows.append(torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), 2, 1, dtype=acc))
            rows.append(torch.linalg.vector_norm(flat[whole:], 2, dim=0, dtype=acc).reshape(1))
            lengths.append(whole // _ROW + 1)
        squares = torch.cat(rows).double().square()
        powers = torch.segment_reduce(squares, "sum", lengths=torch.tensor(lengths)).to(acc)
    if len(large) == len(xs):
        return powers
    large_set = set(large)
    small = [i for i in range(len(xs)) if i not in large_set]
    norms = torch.stack(torch._foreach_norm([xs[i] for i in small], p, dtype=acc))
    out = torch.empty(len(xs), dtype=acc, device=powers.device)
    out[small] = norms * norms if p == 2 else norms
    out[large] = powers
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x``'s elements as a 1-D view, in memory order (channels_last included); a copy only
    for tensors that are not dense in any order."""
    if not x.is_contiguous():
        order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
        permuted = x.permute(order)
        if permuted.is_contiguous():
            return permuted.view(-1)
    return x.reshape(-1)


def _row_powers(p: int, stacked: torch.Tensor, n: int) -> torch.Tensor:
    """``sum(|x|)`` (p = 1) or ``sum(x**2)`` (p = 2) of each of the ``n`` stacked tensors."""
    # reshape, not view: channels_last kernels stack into a non-contiguous tensor.
    rows = stacked.reshape(n, -1)
    acc = accumulation_dtype(stacked.dtype)
    if p == 2:
        norms = torch.linalg.vector_norm(rows, 2, dim=1, dtype=acc)
        return norms * norms
    return rows.abs().sum(dim=1, dtype=acc)


def _group_backward(
    p: int,
    coef: float | torch.Tensor,
    xs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    grad_total: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    if p == 2:
        # d/dx c*||x||^2 = 2c x; the 0-dim factor keeps the gradient in x's dtype.
        grads = torch._foreach_mul(xs, grad_total * (2.0 * coef))
    else:
        grads = torch._foreach_sign(xs)
        torch._foreach_mul_(grads, grad_total * coef)
    return (None, None, *grads)


class _GroupPenalty(torch.autograd.Function):
    """``total = coef * sum_i ||x_i||_p^p`` for p in {1, 2}, with per-tensor values on the side."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, p: int, coef: float | torch.Tensor, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total, values = group_forward(p, coef, xs)
        ctx.p, ctx.coef = p, coef
        ctx.save_for_backward(*xs)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        return _group_backward(ctx.p, ctx.coef, ctx.saved_tensors, grad_total)


class _StackedPenalty(torch.autograd.Function):
    """The same penalty for small tensors of one shape on the CPU, stacked into one tensor.

    CPU ``_foreach_*`` kernels loop over their tensors one by one, about 1.5 us each, which
    is most of the time for small tensors (biases, norm weights, small kernels). Stacked, the
    forward and the backward are each one or two kernels, and the backward hands autograd the
    rows of one gradient tensor (``unbind``: views, no copies). The stacked copy is kept for
    the backward; only tensors of at most ``_STACK_MAX_BYTES`` are stacked.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, p: int, coef: float | torch.Tensor, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            stacked = torch.stack(xs)
        except RuntimeError as exc:  # shapes differ: only a direct group_penalty call can do it
            raise ValueError(f"tensors must all have one shape with stack=True: {exc}") from exc
        values = coef * _row_powers(p, stacked, len(xs))
        ctx.p, ctx.coef = p, coef
        # The tensors too: autograd's in-place-modification check, and the double backward.
        ctx.save_for_backward(stacked, *xs)
        ctx.mark_non_differentiable(values)
        return values.sum(), values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        stacked, *xs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate through the tensors
            return _group_backward(ctx.p, ctx.coef, xs, grad_total)
        if ctx.p == 2:
            grads = stacked * (grad_total * (2.0 * ctx.coef))
        else:
            grads = torch.sign(stacked).mul_(grad_total * ctx.coef)
        return (None, None, *grads.unbind(0))


class _GroupPenaltyForTransforms(torch.autograd.Function):
    """The same node in the ``setup_context`` style that ``torch.func`` transforms require.

    Used only while a transform is active: in plain eager mode this style costs more Python
    time (measured: forward and backward of a 100-tensor group, 850 us -> 950 us).
    """

    @staticmethod
    def forward(
        p: int, coef: float | torch.Tensor, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return group_forward(p, coef, xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        p, coef, *xs = inputs
        ctx.p, ctx.coef = p, coef
        ctx.save_for_backward(*xs)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        return _group_backward(ctx.p, ctx.coef, ctx.saved_tensors, grad_total)


def group_penalty(
    p: int,
    coef: float | torch.Tensor,
    tensors: Sequence[torch.Tensor],
    stack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(total, per_tensor_values)`` for tensors sharing one device and dtype.

    ``p`` is 1 (``coef * sum(abs(x))``) or 2 (``coef * sum(x**2)``).
    Only ``total`` carries gradients. ``stack=True`` (tensors of one shape only) computes
    the same values from one stacked copy, which is faster for small CPU tensors; it is
    ignored while ``torch.compile`` traces or a ``torch.func`` transform is active.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if torch._C._are_functorch_transforms_active():
        total, values = _GroupPenaltyForTransforms.apply(p, coef, *tensors)
    elif stack and not is_compiling():
        total, values = _StackedPenalty.apply(p, coef, *tensors)
    else:
        total, values = _GroupPenalty.apply(p, coef, *tensors)
    return total, values


def group_value(
    p: int,
    coef: float | torch.Tensor,
    tensors: Sequence[torch.Tensor],
    stack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_penalty``'s ``(total, per_tensor_values)`` without autograd: the value of the
    penalties an optimizer applies (``attach_optimizer``), which carries no gradient.

    No node is built and nothing is kept, so ``stack=True`` (tensors of one shape) pays for
    small tensors up to a larger size than in ``group_penalty``: the stacked copy is freed at
    once, and one reduction over its rows replaces one kernel per tensor.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    with torch.no_grad():
        if torch._C._are_functorch_transforms_active() or is_compiling():
            return group_penalty(p, coef, tensors)
        if stack:
            values = coef * _row_powers(p, torch.stack(tuple(tensors)), len(tensors))
            return values.sum(), values
        return group_forward(p, coef, tuple(tensors))


def _differences(
    xs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    if xs[0].dtype in (torch.float16, torch.bfloat16):
        # Half-precision differences would round: subtract in float32.
        acc = accumulation_dtype(xs[0].dtype)
        xs, refs = [x.to(acc) for x in xs], [r.to(acc) for r in refs]
    return tuple(torch._foreach_sub(list(xs), list(refs)))


class _DifferencePenalty(torch.autograd.Function):
    """``total = coef * sum_i ||x_i - r_i||^2`` with per-tensor values on the side.

    The differences the forward computes are kept and become the gradients in place in the
    backward (``2 * coef * (x - r)``): the gradient tensors are allocated in the forward
    rather than in the backward, and each step reads the weights twice, not three times.
    A second backward (``retain_graph=True``) computes them again from the inputs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, coef: Any, n: int, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diffs = _differences(tensors[:n], tensors[n:])
        total, values = group_forward(2, coef, diffs)
        ctx.coef, ctx.n = coef, n
        ctx.save_for_backward(*tensors)
        ctx.diffs = diffs if diffs[0].dtype == tensors[0].dtype else None
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        tensors, n = ctx.saved_tensors, ctx.n
        diffs, ctx.diffs = ctx.diffs, None
        factor = grad_total * (2.0 * ctx.coef)
        grads: Sequence[torch.Tensor]
        if diffs is None or torch.is_grad_enabled():  # a second backward, or create_graph
            grads = torch._foreach_sub(list(tensors[:n]), list(tensors[n:]))
            grads = torch._foreach_mul(grads, factor)
        else:
            grads = list(diffs)
            torch._foreach_mul_(grads, factor)
        return (None, None, *grads, *([None] * n))


def difference_penalty(
    coef: Any, tensors: Sequence[torch.Tensor], references: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, per_tensor_values)`` of ``coef * sum((x - r)**2)`` for each pair, tensors and
    references sharing one device and dtype; only ``total`` carries gradients (to the
    tensors, not the references)."""
    if torch._C._are_functorch_transforms_active() or (
        torch.is_grad_enabled() and any(r.requires_grad for r in references)
    ):
        # Plain differentiable operations: torch.func transforms, or references that train.
        acc = accumulation_dtype(tensors[0].dtype)
        values = torch.stack(
            [(x.to(acc) - r.to(acc)).square().sum() for x, r in zip(tensors, references)]
        )
        values = coef * values
        return values.sum(), values.detach()
    total, values = _DifferencePenalty.apply(coef, len(tensors), *tensors, *references)
    return total, values
