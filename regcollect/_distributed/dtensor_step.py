"""The attached step (``attach_optimizer``) on ``DTensor`` parameters: tensor parallelism,
FSDP2, and both on a 2-D mesh.

The step's math runs on each rank's local tensors, never through DTensor's dispatch: a foreach
call given plain tensors and DTensors together fails ("got mixed torch.Tensor and DTensor"),
and one given DTensors of several meshes or placements need not keep them. The step's
parameters are grouped by kind first (plain, or a DTensor's mesh, placements and its
gradient's placements), each kind gets the rule that makes the result one process's, and the
local tensors then go to the penalty's foreach math together.

A parameter's placement on each mesh dimension:

- ``Shard(d)``, ``_StridedShard(d)`` (FSDP2 over tensor parallelism): each rank holds a piece
  of the tensor, cut along tensor dimension ``d``. Elementwise math (L1, L2) applied to each
  piece is the whole tensor's; a term that needs more of the tensor (a group lasso's groups)
  says which cuts it allows (``Term.shardable``).
- ``Replicate()``: each rank holds all of it and applies the same math to the same values,
  so the replicas stay equal.
- ``Partial()``: the local values are addends of the tensor, not a piece of it; the step does
  not apply there (the penalty stays in ``loss()``, with its gradient), and a decoupled step
  asked for it is refused.

The coupled step adds to the gradient, whose placements may differ from the parameter's: a
``Replicate`` parameter's gradient is ``Partial(sum)`` under sequence parallelism (each rank
holds its part of the sum the optimizer completes), so the penalty's gradient is added on the
first rank of each such mesh dimension only (``Partial(avg)``: on every rank). Any other pair
is refused, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .dtensor import Shardable, cut_dims, is_dtensor

__all__ = ["local_lists", "unsteppable"]


def unsteppable(x: torch.Tensor, regularizer: object, terms: Sequence[Shardable]) -> str:
    """Why a decoupled step cannot apply ``regularizer`` (its step terms ``terms``) to the
    DTensor ``x``, and the way out (the end of an error message naming the parameter)."""
    cut = cut_dims(x)
    whole = all(term.shardable(frozenset(), x.dim()) for term in terms)
    if cut is None:
        why = "a Partial placement holds addends of the tensor, not a piece of it"
    elif whole:
        why = (
            "its step math needs parts of the tensor that they split across the ranks "
            f"(along dimension(s) {sorted(cut)})"
        )
    else:
        why = "its step math applies to plain tensors only"
    way_out = (
        "; or place the parameter so that each rank holds the parts the penalty needs whole"
        if cut and whole
        else ""
    )
    return (
        f"a DTensor with placements {tuple(x.placements)} on a mesh of shape "  # type: ignore[attr-defined]
        f"{tuple(x.device_mesh.shape)}, and {why}, so the decoupled step "  # type: ignore[attr-defined]
        f"cannot apply {regularizer!r} to it exactly. Attach the optimizer coupled "
        f"(decoupled=False): rc.loss() then gives this penalty's gradient exactly{way_out}"
    )


def local_lists(
    params: list[torch.Tensor],
    where: list[Any],
    grads: list[torch.Tensor] | None,
    describe: Callable[[int], str],
) -> tuple[list[torch.Tensor], list[Any], list[torch.Tensor] | None]:
    """The step's lists on this rank: plain tensors as they are, each DTensor's local tensor,
    grouped by kind, without the parameters whose penalty gradient another rank adds
    (coupled: ``grads`` given). ``describe(i)`` names ``params[i]`` in errors.

    Raises:
        ValueError: A gradient whose placements no rule maps onto its parameter's.
    """
    kinds: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        key = None
        if is_dtensor(p):
            grad = None if grads is None else grads[i]
            grad_placements = (
                tuple(grad.placements)  # type: ignore[attr-defined]
                if grad is not None and is_dtensor(grad)
                else None
            )
            key = (p.device_mesh, tuple(p.placements), grad_placements)  # type: ignore[attr-defined]
        kinds.setdefault(key, []).append(i)
    out_p: list[torch.Tensor] = []
    out_w: list[Any] = []
    out_g: list[torch.Tensor] | None = None if grads is None else []
    for key, indices in kinds.items():
        if key is not None and grads is not None:
            if not _adds_here(params, grads, indices, describe):
                continue
        for i in indices:
            out_p.append(_local(params[i]))
            out_w.append(where[i])
            if out_g is not None and grads is not None:
                out_g.append(_local(grads[i]))
    return out_p, out_w, out_g


def _local(x: torch.Tensor) -> torch.Tensor:
    # Under no_grad, to_local() is the DTensor's own local tensor: in-place math on it is on
    # the parameter (or gradient) itself.
    return x.to_local() if is_dtensor(x) else x  # type: ignore[attr-defined,no-any-return]


def _adds_here(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[int],
    describe: Callable[[int], str],
) -> bool:
    """Whether this rank adds the coupled penalty's gradient to the gradients of one kind
    (``indices``: the same mesh, parameter placements and gradient placements)."""
    first = indices[0]
    p, grad = params[first], grads[first]
    mesh = p.device_mesh  # type: ignore[attr-defined]
    if not is_dtensor(grad) or grad.device_mesh != mesh:  # type: ignore[attr-defined]
        raise ValueError(_grad_message(describe(first), p, grad))
    here = True
    for dim, (mine, its) in enumerate(zip(p.placements, grad.placements)):  # type: ignore[attr-defined]
        if its == mine:
            continue
        op = getattr(its, "reduce_op", None) if its.is_partial() else None
        if not mine.is_replicate() or op not in ("sum", "avg"):
            raise ValueError(_grad_message(describe(first), p, grad))
        # A sum of the ranks' addends: added once, by the first rank of this mesh dimension.
        # An average: added by every rank, it averages to itself.
        if op == "sum":
            here = here and mesh.get_local_rank(dim) == 0
    return here


def _grad_message(name: str, p: torch.Tensor, grad: torch.Tensor) -> str:
    placements = tuple(grad.placements) if is_dtensor(grad) else "none (a plain tensor)"  # type: ignore[attr-defined]
    return (
        f"attach_optimizer: {name} is a DTensor with placements {tuple(p.placements)} "  # type: ignore[attr-defined]
        f"and its gradient has placements {placements}: the coupled step cannot add the "
        "penalty's gradient to it exactly. Give the gradient the parameter's placements before "
        "optimizer.step() (p.grad = p.grad.redistribute(p.device_mesh, p.placements)), or "
        "leave the penalty in the loss (no attach_optimizer)"
    )
