"""The shared machinery of the step math of the penalties an optimizer applies
(``attach_optimizer``), shaped like ``torch.optim``'s functional optimizers: lists of tensors
in, in-place multi-tensor updates, grouped by device and dtype first. Each penalty's own step
math is in its module (its ``Term``); nothing here knows a penalty.

What ``torch.optim`` passes its own kernels, the step math takes too:

- ``grad_scale``: the gradient scale a fused optimizer removes inside its step (``GradScaler``
  without ``unscale_``); a coupled gradient is multiplied by it, so that it comes out whole.
- ``keep``: ``1 - found_inf`` (or None): 0 on a step the scaler skips, so that the decoupled
  decay and the proximal steps apply nothing then, without reading the flag on the host.
- a learning rate that may be a tensor (``capturable``/``fused``): it stays on its device.

Temporaries (L1 signs, differences to an L2-SP reference, the proximal clamp) are made a chunk
of tensors at a time (``chunks``), at most max(1 MiB, one tensor): the step holds at most one
gradient-sized tensor more, as SGD's ``weight_decay`` does on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["Scalar", "add_coupled_", "by_device_and_dtype", "chunks", "on_device", "scaled"]

Scalar = float | torch.Tensor

_TEMPORARY_BYTES = 1 << 20


def by_device_and_dtype(
    *lists: Sequence[torch.Tensor],
) -> Iterator[tuple[torch.device, tuple[list[torch.Tensor], ...]]]:
    """Parallel sub-lists of ``lists`` whose first tensors share a device and a dtype, as
    torch.optim groups them before its foreach calls (the same C++ helper)."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([list(x) for x in lists])
    for (device, _), (bucket, _indices) in grouped.items():  # type: ignore[misc]
        yield device, tuple(bucket)  # type: ignore[arg-type,misc]


def chunks(*lists: list[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], ...]]:
    """Parallel slices of ``lists`` whose first tensors total at most
    ``max(_TEMPORARY_BYTES, the largest of them)`` bytes."""
    sizes = [p.nbytes for p in lists[0]]
    if not sizes:
        return
    budget = max(_TEMPORARY_BYTES, max(sizes))
    start, held = 0, 0
    for i, size in enumerate(sizes):
        if held + size > budget:
            yield tuple(items[start:i] for items in lists)
            start, held = i, 0
        held += size
    yield tuple(items[start:] for items in lists)


def on_device(value: Scalar | None, device: torch.device) -> Scalar | None:
    """``value`` where the tensors are: a tensor is moved without a host read."""
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


def add_coupled_(
    grads: list[torch.Tensor],
    terms: list[torch.Tensor],
    alpha: float,
    grad_scale: torch.Tensor | None,
) -> None:
    """``grad += alpha * grad_scale * term`` in place, for temporaries ``terms``."""
    if grad_scale is not None:
        torch._foreach_mul_(terms, on_device(grad_scale, terms[0].device))  # type: ignore[arg-type]
    torch._foreach_add_(grads, terms, alpha=alpha)


def scaled(rate: Scalar, keep: torch.Tensor | None, device: torch.device) -> Scalar:
    """``rate * keep`` on ``device``: a float stays a float when nothing is skipped."""
    rate = on_device(rate, device)  # type: ignore[assignment]
    if keep is None:
        return rate
    kept = on_device(keep, device)
    return kept * rate  # type: ignore[operator]
