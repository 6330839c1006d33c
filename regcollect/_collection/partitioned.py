"""Where the values of the tensors a collection regularizes are, asked of the engines'
adapters (``regcollect._distributed.seam``) once per plan build.

Penalties that need the whole tensor (orthogonal, custom, L2-SP, group lasso) are refused on
parameters an engine holds in parts, clearly, rather than computed on a part
(``regcollect._engine.plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from .._distributed.placement import Placed
from .._distributed.seam import place
from .entries import WEIGHT, Entry

__all__ = ["prepare"]


def _named(entry: Entry) -> str:
    return repr(entry.base_name()[0])


def prepare(
    entries: Sequence[Entry], tensors: Sequence[torch.Tensor | None]
) -> tuple[list[Placed | None], list[torch.Tensor]]:
    """Before a plan is built: for ``entries``, whose current tensors are ``tensors``, the
    tensor the plan evaluates for each and its placement (None: no tensor now), and the
    parameters engines hold the gone ones in (whose ``requires_grad`` the plan depends on:
    freezing one changes no module attribute the plan's other checks see).

    Raises:
        ValueError: A weight entry's parameter is gone from its module, and no engine holds it.
    """
    out: list[Placed | None] = []
    holders: dict[int, torch.Tensor] = {}
    for entry, tensor in zip(entries, tensors):
        weight = entry.kind == WEIGHT
        placed = place(
            tensor,
            entry.module if weight else None,
            entry.param if weight else None,
            partial(_named, entry),
        )
        if tensor is None and placed is not None:
            holder = placed[1].holder
            if holder is not None:
                holders[id(holder)] = holder
        out.append(placed)
    return out, list(holders.values())
