"""Computes many penalties at once.

A ``Plan`` is built once from ``(tensor, regularizer)`` pairs and evaluated every training
step. Regularizers that are sums of L1/L2 terms (``Regularizer.terms``) are split into their
terms and grouped by ``(kind, coefficient, device, dtype)``; each group is a single autograd node
whose forward is one ``torch._foreach_norm`` and whose backward is one or two ``torch._foreach_*``
calls, accumulating in float32 at least. On the CPU, where ``_foreach_*`` kernels loop over
their tensors one by one, 16 or more small tensors of one shape are stacked instead, so that
each step is one kernel (``_StackedPenalty``). Other regularizers (orthogonal, custom)
are called on their tensor one by one. The per-call Python cost is proportional to the number
of groups, not the number of tensors, and nothing here reads a value back to the host.

Sharded tensors (``DTensor``, as FSDP2 and tensor parallelism make them) are handled exactly:

* L1/L2 terms are sums over elements, so each rank computes them on its local shard, in the
  same grouped kernels, and the partial values of every sharded tensor are summed across the
  ranks that hold the shards with **one** all-reduce per ``loss()`` (one per sharded mesh
  dimension, so one for FSDP2 and HSDP). The all-reduce is outside autograd: each rank's
  gradient is the gradient of its own shard's partial penalty, which is exactly the shard of
  the full penalty's gradient, with no factor of the world size. The all-reduced vector has a
  layout every rank shares (``_Layout``): slots for each sharded tensor the caller
  registered, trained here or not, and a count of the ranks training it, so ranks that
  disagree (a parameter frozen on one rank) get an error instead of a mismatched collective.
* Other regularizers (orthogonal, custom) need the whole tensor: it is gathered
  (``full_tensor()``, one all-gather per such tensor), every rank computes the same value, and
  the gathered tensor's backward hands each rank the gradient of its own shard.

This module knows nothing of modules, names or collections.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .regularizers import Regularizer, accumulation_dtype, fused_terms

__all__ = ["Plan", "Result", "group_penalty"]


def _group_forward(
    kind: str, coef: float, xs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(xs[0].dtype)
    # A group shares one device: only CPU groups look for large tensors (no per-tensor work
    # on other devices, every step).
    cpu = xs[0].device.type == "cpu"
    large = [i for i, x in enumerate(xs) if x.numel() > _EXACT_MIN] if cpu else []
    if large and not torch.compiler.is_compiling():
        powers = _cpu_powers(kind, xs, large, acc)
    else:
        norms = torch.stack(torch._foreach_norm(xs, 1 if kind == "l1" else 2, dtype=acc))
        powers = norms * norms if kind == "l2" else norms
    values = coef * powers
    return values.sum(), values


# CPU reductions of more elements than this are computed exactly (see _cpu_powers).
_EXACT_MIN = 16384
_ROW = 1024


def _cpu_powers(
    kind: str, xs: tuple[torch.Tensor, ...], large: list[int], acc: torch.dtype
) -> torch.Tensor:
    """``sum(|x|)`` (l1) or ``sum(x**2)`` (l2) of each tensor, to float precision on the CPU.

    The CPU ``_foreach_norm`` accumulates each tensor in one float32 sum, whose error grows
    with its length: on a 4096x1024 weight the L2 value was off by 1.6e-4 relative and the L1
    value by 1.2e-3 (float64 reference). Tensors of more than ``_EXACT_MIN`` elements are
    reduced in blocks instead, as ``torch.sum`` does: L2 as rows of ``_ROW`` elements (one
    ``vector_norm`` per tensor, as fast as ``_foreach_norm``) whose squares are summed per
    tensor in float64 (all tensors at once: a few thousand values); L1 as ``abs().sum()``, 3x
    faster than the CPU ``_foreach_norm(ord=1)``. Both agree with float64 to about 1e-7.
    """
    if kind == "l1":
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
    exact = set(large)
    small = [i for i in range(len(xs)) if i not in exact]
    norms = torch.stack(
        torch._foreach_norm([xs[i] for i in small], 1 if kind == "l1" else 2, dtype=acc)
    )
    out = torch.empty(len(xs), dtype=acc, device=powers.device)
    out[small] = norms * norms if kind == "l2" else norms
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


def _group_backward(
    kind: str,
    coef: float,
    xs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    grad_total: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    if kind == "l2":
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
        ctx: Any, kind: str, coef: float, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total, values = _group_forward(kind, coef, xs)
        ctx.kind, ctx.coef = kind, coef
        ctx.save_for_backward(*xs)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        return _group_backward(ctx.kind, ctx.coef, ctx.saved_tensors, grad_total)


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
        ctx: Any, kind: str, coef: float, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            stacked = torch.stack(xs)
        except RuntimeError as exc:  # shapes differ: only a direct group_penalty call can do it
            raise ValueError(f"tensors must all have one shape with stack=True: {exc}") from exc
        # reshape, not view: channels_last kernels stack into a non-contiguous tensor.
        rows = stacked.reshape(len(xs), xs[0].numel())
        acc = accumulation_dtype(stacked.dtype)
        if kind == "l2":
            norms = torch.linalg.vector_norm(rows, 2, dim=1, dtype=acc)
            values = coef * (norms * norms)
        else:
            values = coef * rows.abs().sum(dim=1, dtype=acc)
        ctx.kind, ctx.coef = kind, coef
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
            return _group_backward(ctx.kind, ctx.coef, xs, grad_total)
        if ctx.kind == "l2":
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
    def forward(kind: str, coef: float, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return _group_forward(kind, coef, xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        kind, coef, *xs = inputs
        ctx.kind, ctx.coef = kind, coef
        ctx.save_for_backward(*xs)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: torch.Tensor, _grad_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        return _group_backward(ctx.kind, ctx.coef, ctx.saved_tensors, grad_total)


def group_penalty(
    kind: str, coef: float, tensors: Sequence[torch.Tensor], stack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(total, per_tensor_values)`` for tensors sharing one device and dtype.

    ``kind`` is ``"l1"`` (``coef * sum(abs(x))``) or ``"l2"`` (``coef * sum(x**2)``).
    Only ``total`` carries gradients. ``stack=True`` (tensors of one shape only) computes
    the same values from one stacked copy, which is faster for small CPU tensors; it is
    ignored while ``torch.compile`` traces or a ``torch.func`` transform is active.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f'kind must be "l1" or "l2", got {kind!r}')
    if torch._C._are_functorch_transforms_active():
        total, values = _GroupPenaltyForTransforms.apply(kind, coef, *tensors)
    elif stack and not torch.compiler.is_compiling():
        total, values = _StackedPenalty.apply(kind, coef, *tensors)
    else:
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
    """A reusable grouping of ``(tensor, regularizer)`` pairs; call it to get a ``Result``.

    Examples:
        >>> w = torch.ones(2, 2, requires_grad=True)
        >>> from regcollect.regularizers import L2, L1L2
        >>> plan = Plan([w, w[0]], [L2(0.5), L1L2(1.0, 0.0)])
        >>> plan().total.item()   # 0.5 * 4 + 1.0 * 2
        4.0
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        regularizers: Sequence[Regularizer],
        describe: Callable[[int], str] | None = None,
        registered: Sequence[torch.Tensor | None] | None = None,
        describe_registered: Callable[[int], str] | None = None,
        no_grad: set[int] | frozenset[int] = frozenset(),
    ):
        if len(tensors) != len(regularizers):
            raise ValueError(
                f"tensors and regularizers must have the same length, "
                f"got {len(tensors)} and {len(regularizers)}"
            )
        self.tensors = list(tensors)
        self.regularizers = list(regularizers)
        # Names the tensor in error messages; called only when a regularizer fails.
        self.describe = describe or (lambda i: f"tensor {i}")
        # Plain tensors go straight to the kernels; a DTensor contributes its local shard,
        # taken with to_local() at every call so that gradients reach the sharded parameter.
        groups: dict[tuple[Any, ...], list[int]] = {}
        self.fallback: list[int] = []
        for i, (x, reg) in enumerate(zip(self.tensors, self.regularizers)):
            terms = fused_terms(reg) if x.is_floating_point() else None
            reduce_over = _shard_reduction(x) if terms is not None else None
            if terms is None or reduce_over is None:
                self.fallback.append(i)
                continue
            # Zero terms are skipped, but a tensor whose terms are all zero (a lambda = 0 run
            # of a sweep) keeps one, so that it stays in the graph with a zero gradient.
            # A replicated DTensor has nothing to reduce but still needs to_local(): it must
            # not share a group with plain tensors, hence the is-DTensor part of the key.
            # Tensors whose L1/L2 terms an optimizer applies (attach_optimizer): their value
            # is computed without autograd, in groups of their own.
            detached = id(x) in no_grad
            key = (x.device, x.dtype, _is_dtensor(x), reduce_over, detached, _stack_shape(x))
            for kind, coef in [t for t in terms if t[1]] or terms[:1]:
                groups.setdefault((kind, coef, *key), []).append(i)
        # Stacking pays for its extra node only with enough tensors of one shape; fewer go
        # back to the group's foreach node, so the node count stays bounded.
        merged: dict[tuple[Any, ...], list[int]] = {}
        for key, idx in groups.items():
            if key[-1] is not None and len(idx) < _STACK_MIN:
                key = (*key[:-1], None)
            merged.setdefault(key, []).extend(idx)
        self.groups = [
            _Group(
                kind,
                coef,
                idx,
                [self.tensors[i] for i in idx],
                sharded,
                reduce_over,
                shape is not None,
                detached,
            )
            for (kind, coef, _, _, sharded, reduce_over, detached, shape), idx in merged.items()
        ]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.dtype = torch.float32
        for x in self.tensors:
            self.dtype = torch.promote_types(self.dtype, accumulation_dtype(x.dtype))
        self.layouts = _layouts(
            self.tensors,
            self.groups,
            self.tensors if registered is None else registered,
            describe_registered or self.describe,
            self.dtype,
        )

    def __call__(self) -> Result:
        total: torch.Tensor | None = None
        parts: list[tuple[torch.Tensor, list[int]]] = []
        pending: dict[tuple[Any, ...], list[tuple[_Group, torch.Tensor, torch.Tensor]]] = {}
        for group in self.groups:
            tensors = group.tensors
            if group.sharded:
                tensors = [x.to_local() for x in tensors]  # type: ignore[attr-defined]
            if group.detached:
                with torch.no_grad():
                    group_total, values = group_penalty(group.kind, group.coef, tensors)
            else:
                group_total, values = group_penalty(group.kind, group.coef, tensors, group.stacked)
            if group.reduce_over:
                pending.setdefault(group.reduce_over, []).append((group, group_total, values))
            else:
                total = _add(total, group_total, self.device, self.dtype)
                parts.append((values, group.indices))
        for reduce_over, layout in self.layouts.items():
            # Partial values from every shard, in a layout every rank shares: one all-reduce
            # for all sharded tensors alike, which also counts the ranks training each one.
            local_parts = pending.get(reduce_over, [])
            local = layout.flags.clone()
            if local_parts:
                local.index_put_(
                    (torch.cat([layout.slots[id(g)] for g, _, _ in local_parts]),),
                    torch.cat([v.to(self.dtype) for _, _, v in local_parts]),
                    accumulate=True,
                )
            full = _all_reduce(local, reduce_over)
            layout.check(full)
            value = full[layout.values].sum()
            if local_parts:
                local_total = _sum([t.to(self.dtype) for _, t, _ in local_parts])
                # The value is the full penalty, bit-identical on every rank; the gradient is
                # that of this rank's partial penalty, i.e. exactly this shard's part of it.
                value = value + (local_total - local_total.detach())
            total = _add(total, value, self.device, self.dtype)
            if layout.part_indices:
                parts.append((full[layout.part_slots], layout.part_indices))
        for i in self.fallback:
            x = self.tensors[i]
            if _is_dtensor(x):
                x = _ContiguousGrad.apply(x.full_tensor())  # type: ignore[attr-defined]
            try:
                value = self.regularizers[i](x)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{self.describe(i)}: {exc}") from exc
            parts.append((value.detach().reshape(1), [i]))
            total = _add(total, value, self.device, self.dtype)
        if total is None:
            total = torch.zeros((), dtype=self.dtype, device=self.device)
        return Result(total, parts)


class _Layout:
    """The all-reduce vector of one set of mesh dimensions, the same on every rank.

    Three slots per sharded tensor registered (trained on this rank or not), in registration
    order: its L1 and L2 partial values, and 1 if this rank trains it. After the all-reduce,
    a count other than 0 or the number of ranks means the ranks disagree on what they
    regularize (a parameter frozen on some ranks only); ``check`` raises then, on every
    rank at once, instead of letting the next collective hang.
    """

    def __init__(
        self,
        registered: list[torch.Tensor],
        here: dict[int, int],
        groups: list[_Group],
        reduce_over: tuple[Any, ...],
        describe: Callable[[int], str],
        registered_index: list[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slot = {id(x): i for i, x in enumerate(registered)}
        self.ranks = 1
        for mesh, dim in reduce_over:
            self.ranks *= mesh.size(dim)
        self.describe, self.registered_index = describe, registered_index
        flags = torch.zeros(3 * len(registered), dtype=dtype)
        for x in registered:
            if id(x) in here:
                flags[3 * slot[id(x)] + 2] = 1.0
        self.flags = flags.to(device)
        self.values = torch.tensor(
            [3 * i + k for i in range(len(registered)) for k in (0, 1)], device=device
        )
        self.slots: dict[int, torch.Tensor] = {}
        used: dict[int, int] = {}  # value slot -> the plan index of its tensor
        for g in groups:
            if g.reduce_over != reduce_over:
                continue
            offset = 0 if g.kind == "l1" else 1
            positions = [3 * slot[id(x)] + offset for x in g.tensors]
            self.slots[id(g)] = torch.tensor(positions, device=device)
            used.update(zip(positions, g.indices))
        self.part_slots = torch.tensor(sorted(used), device=device, dtype=torch.long)
        self.part_indices = [used[p] for p in sorted(used)]

    def check(self, full: torch.Tensor) -> None:
        counts = full[2::3]
        bad = (counts != 0) & (counts != self.ranks)
        if torch.compiler.is_compiling() or counts.device.type != "cpu":
            # No host synchronisation on a GPU: the check runs on the device.
            torch._assert_async(
                ~bad.any(),
                "regcollect: the ranks regularize different sharded tensors (a parameter "
                "frozen on some ranks only?); every rank must train the same ones",
            )
            return
        if bool(bad.any()):
            found = bad.nonzero().flatten().tolist()
            listed = "; ".join(
                f"{self.describe(self.registered_index[i])} is trained on {int(counts[i])} of "
                f"{self.ranks} ranks"
                for i in found
            )
            raise RuntimeError(
                f"loss(): the ranks do not regularize the same sharded tensors: {listed}. "
                "A parameter frozen (requires_grad=False) on some ranks "
                "only, or a scope that differs between ranks, gives each rank a different "
                "penalty; freeze the same parameters and use the same scope on every rank."
            )


def _layouts(
    tensors: list[torch.Tensor],
    groups: list[_Group],
    registered: Sequence[torch.Tensor | None],
    describe: Callable[[int], str],
    dtype: torch.dtype,
) -> dict[tuple[Any, ...], _Layout]:
    """One ``_Layout`` per set of mesh dimensions that sharded tensors reduce over."""
    here = {id(x): i for i, x in enumerate(tensors)}
    by_key: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
    seen: set[int] = set()
    for i, x in enumerate(registered):
        if x is None or id(x) in seen or not _is_dtensor(x):
            continue
        seen.add(id(x))
        reduce_over = _shard_reduction(x)
        if reduce_over:  # sharded and summable; replicated DTensors need no collective
            listed, index = by_key.setdefault(reduce_over, ([], []))
            listed.append(x)
            index.append(i)
    return {
        key: _Layout(listed, here, groups, key, describe, index, dtype, listed[0].device)
        for key, (listed, index) in by_key.items()
    }


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    A gathered tensor's gradient goes back to its shards through DTensor's redistribution;
    a regularizer whose gradient is a broadcast view (``(w.sum(1) ** 2).sum()`` gives an
    expanded, stride-0 tensor) reached FSDP2 as an unsharded gradient on torch 2.11.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


@dataclass
class _Group:
    kind: str
    coef: float
    indices: list[int]
    tensors: list[torch.Tensor]
    # DTensors, which contribute their local shard (to_local()) to the kernels.
    sharded: bool
    # () for tensors whose values are all here; else the (mesh, dim) pairs to sum over.
    reduce_over: tuple[Any, ...]
    # Small CPU tensors of one shape, computed from one stacked copy (_StackedPenalty).
    stacked: bool
    # Applied by an optimizer (attach_optimizer): the value only, no autograd node.
    detached: bool = False


# Stacking small CPU tensors: at most this many bytes each, at least this many of one shape.
# Measured (forward + backward into existing .grad, one thread): 100 tensors of 64 to 1024
# float32 elements take 0.74-0.80x the foreach node's time, 1000 of 64 elements 0.69x; at
# 2048-8192 elements the larger stacked copies meet the allocator's page faults and take
# 1.1-1.6x; groups of 4-8 tensors gain nothing (0.9-1.15x) over one extra node.
_STACK_MAX_BYTES = 4 * 1024
_STACK_MIN = 16


def _stack_shape(x: torch.Tensor) -> torch.Size | None:
    """``x``'s shape if it may be stacked with tensors of the same shape, else None."""
    if (
        type(x) in _PLAIN
        and x.device.type == "cpu"
        and x.numel() * x.element_size() <= _STACK_MAX_BYTES
    ):
        return x.shape
    return None


# Tensors that are not subclasses: their values are all here, and they can be stacked.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_dtensor(x: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported; never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _shard_reduction(x: torch.Tensor) -> tuple[Any, ...] | None:
    """How an elementwise-sum penalty of ``x`` is completed from local values.

    ``()`` for plain tensors and replicated DTensors (the local value is the full one);
    ``((mesh, dim), ...)`` for the mesh dimensions a DTensor is sharded over; None when the
    local values cannot be summed (a ``Partial`` placement, another tensor subclass), which
    sends the tensor down the per-tensor path.
    """
    if type(x) in _PLAIN:
        return ()
    if not _is_dtensor(x):
        return None
    from torch.distributed.tensor import Replicate, Shard

    reduce_over = []
    for dim, placement in enumerate(x.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            reduce_over.append((x.device_mesh, dim))  # type: ignore[attr-defined]
        elif not isinstance(placement, Replicate):
            return None
    return tuple(reduce_over)


def _all_reduce(local: torch.Tensor, reduce_over: tuple[Any, ...]) -> torch.Tensor:
    """Sum ``local`` (detached) over the mesh dimensions the tensors are sharded over."""
    out = local.detach().clone()
    for mesh, dim in reduce_over:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return out


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).sum()


def _add(
    total: torch.Tensor | None, value: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if value.device != device or value.dtype != dtype:
        value = value.to(device=device, dtype=dtype, non_blocking=True)
    return value if total is None else total + value
