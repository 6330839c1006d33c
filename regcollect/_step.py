"""The step math of the penalties an optimizer applies (``attach_optimizer``), shaped like
``torch.optim``'s functional optimizers: lists of tensors in, in-place multi-tensor updates,
grouped by device and dtype first; no bookkeeping here.

Each function takes what ``torch.optim`` passes its own kernels:

- ``grad_scale``: the gradient scale a fused optimizer removes inside its step (``GradScaler``
  without ``unscale_``); the coupled penalty is multiplied by it, so that it comes out whole.
- ``keep``: ``1 - found_inf`` (or None): 0 on a step the scaler skips, so that the decoupled
  decay and the proximal steps apply nothing then, without reading the flag on the host.
- a learning rate that may be a tensor (``capturable``/``fused``): it stays on its device.

Temporaries (L1 signs, differences to an L2-SP reference, the proximal clamp) are made a chunk
of tensors at a time, at most max(1 MiB, one tensor): the step holds at most one
gradient-sized tensor more, as SGD's ``weight_decay`` does on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "Scalar",
    "block_soft_threshold_",
    "coupled_",
    "decay_",
    "group_coupled_",
    "group_directions",
    "pull_",
    "soft_threshold_",
]

Scalar = float | torch.Tensor

_TEMPORARY_BYTES = 1 << 20


def _by_device_and_dtype(
    *lists: Sequence[torch.Tensor],
) -> Iterator[tuple[torch.device, tuple[list[torch.Tensor], ...]]]:
    """Parallel sub-lists of ``lists`` whose first tensors share a device and a dtype, as
    torch.optim groups them before its foreach calls (the same C++ helper)."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([list(x) for x in lists])
    for (device, _), (bucket, _indices) in grouped.items():  # type: ignore[misc]
        yield device, tuple(bucket)  # type: ignore[arg-type,misc]


def _chunks(*lists: list[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], ...]]:
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


def _on(value: Scalar | None, device: torch.device) -> Scalar | None:
    """``value`` where the tensors are: a tensor is moved without a host read."""
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


def coupled_(
    kind: str,
    coef: float,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    refs: list[torch.Tensor] | None = None,
    *,
    sign: float = 1.0,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """``grad += sign * grad_scale * d(penalty)/dw`` in place, for ``kind`` "l2"
    (``2 c w``), "l1" (``c sign(w)``) or "l2sp" (``2 c (w - w0)``, ``refs`` the w0)."""
    lists = (params, grads) if refs is None else (params, grads, refs)
    multiplier = coef if kind == "l1" else 2.0 * coef
    for device, bucket in _by_device_and_dtype(*lists):
        scale = _on(grad_scale, device)
        if kind == "l2" and scale is None:  # in place: no temporary at all
            torch._foreach_add_(bucket[1], bucket[0], alpha=sign * multiplier)
            continue
        for part in _chunks(*bucket):
            if kind == "l2":
                terms = torch._foreach_mul(part[0], scale)  # type: ignore[arg-type]
            elif kind == "l1":
                terms = torch._foreach_sign(part[0])
            else:
                terms = torch._foreach_sub(part[0], part[2])
            if scale is not None and kind != "l2":
                torch._foreach_mul_(terms, scale)
            torch._foreach_add_(part[1], terms, alpha=sign * multiplier)
            del terms  # before the next chunk's


def decay_(params: list[torch.Tensor], rate: Scalar, keep: torch.Tensor | None = None) -> None:
    """``w *= 1 - rate`` in place (decoupled L2, as AdamW), nothing where ``keep`` is 0."""
    for device, (bucket,) in _by_device_and_dtype(params):
        torch._foreach_mul_(bucket, 1.0 - _scaled(rate, keep, device))  # type: ignore[arg-type]


def pull_(
    params: list[torch.Tensor],
    refs: list[torch.Tensor],
    rate: Scalar,
    keep: torch.Tensor | None = None,
) -> None:
    """``w += rate * (w0 - w)`` in place (decoupled L2-SP: towards the reference, as AdamW
    decays towards zero), nothing where ``keep`` is 0."""
    for device, (ps, rs) in _by_device_and_dtype(params, refs):
        weight = _scaled(rate, keep, device)
        if isinstance(weight, torch.Tensor):
            for p, r in zip(ps, rs):
                p.lerp_(r, weight.to(p.dtype))
        else:
            torch._foreach_lerp_(ps, rs, weight)


def soft_threshold_(
    params: list[torch.Tensor], threshold: Scalar, keep: torch.Tensor | None = None
) -> None:
    """``w = sign(w) * max(|w| - threshold, 0)`` in place: L1's proximal step, exactly 0
    where ``|w| <= threshold``; nothing where ``keep`` is 0."""
    for device, (bucket,) in _by_device_and_dtype(params):
        t = _scaled(threshold, keep, device)
        if isinstance(t, torch.Tensor):  # a tensor learning rate or a skip flag: per tensor
            for p in bucket:
                tp = t.to(p.dtype)
                p.sub_(p.clamp(-tp, tp))
            continue
        # w -= clamp(w, -t, t): one temporary per chunk, in-place pointwise steps.
        for (part,) in _chunks(bucket):
            shrink = torch._foreach_clamp_max(part, t)
            torch._foreach_clamp_min_(shrink, -t)
            torch._foreach_sub_(part, shrink)
            del shrink


def _group_norms(p: torch.Tensor, norms: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * p.dim()
    shape[axis % p.dim()] = -1
    return norms.reshape(shape).clamp_min(torch.finfo(norms.dtype).tiny)


def group_directions(p: torch.Tensor, norms: torch.Tensor, axis: int) -> torch.Tensor:
    """``p_g / ||p_g||`` per group along ``axis`` (0 for a zero group): the group lasso's
    (sub)gradient, given each group's norm."""
    return p / _group_norms(p, norms, axis)


def group_coupled_(
    p: torch.Tensor,
    norms: torch.Tensor,
    axis: int,
    coef: float,
    *,
    sign: float = 1.0,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """``grad += sign * grad_scale * coef * p_g / ||p_g||`` in place: the group lasso's
    (sub)gradient, given each group's norm."""
    direction = group_directions(p, norms, axis)
    if grad_scale is not None:
        direction.mul_(grad_scale.to(direction.device))
    p.grad.add_(direction, alpha=sign * coef)  # type: ignore[union-attr]


def block_soft_threshold_(
    p: torch.Tensor,
    norms: torch.Tensor,
    axis: int,
    threshold: Scalar,
    keep: torch.Tensor | None = None,
) -> None:
    """``p_g *= max(0, 1 - threshold / ||p_g||)`` in place: the group lasso's proximal step,
    which sets every group whose norm is below ``threshold`` exactly to zero."""
    t = _scaled(threshold, keep, p.device)
    p.mul_((1.0 - t / _group_norms(p, norms, axis)).clamp_min(0.0))


def _scaled(rate: Scalar, keep: torch.Tensor | None, device: torch.device) -> Scalar:
    """``rate * keep`` on ``device``: a float stays a float when nothing is skipped."""
    rate = _on(rate, device)  # type: ignore[assignment]
    if keep is None:
        return rate
    kept = _on(keep, device)
    return kept * rate  # type: ignore[operator]
