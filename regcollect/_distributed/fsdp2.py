"""FSDP2 (``fully_shard``) as the attached step meets it: the two objects it keeps per
parameter.

FSDP2 keeps each parameter twice: the sharded ``DTensor`` the optimizer holds, and, after its
first all-gather, an unsharded parameter it puts on the module while the module's parameters
are gathered (between the forward and backward passes for the root module, whose parameters
it does not reshard after the forward pass, and for any module with
``reshard_after_forward=False``). A ``loss()`` computed then sees the unsharded object: the
penalty the optimizer applies to the sharded one must not get a gradient through it too.

FSDP2 is recognised by the method its modules have (``_get_fsdp_state``), so nothing is
imported here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .. import _naming
from .placement import Adapter

__all__ = ["FSDP2Adapter", "loaded", "sharded_twins"]


def loaded() -> bool:
    """Whether FSDP2 can be in use at all (its package is imported): the cheap test first."""
    return "torch.distributed.fsdp" in sys.modules


def sharded_twins(modules: Iterable[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """``id(unsharded parameter) -> sharded parameter`` for every parameter that the FSDP2
    states managing ``modules`` (the modules themselves or their ancestors) have gathered at
    least once; empty without FSDP2."""
    out: dict[int, torch.Tensor] = {}
    if not loaded():
        return out
    seen: set[int] = set()
    for module in modules:
        for owner in (module, *_naming.ancestors(module)):
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            for fsdp_param in _fsdp_params(owner):
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                sharded = getattr(fsdp_param, "sharded_param", None)
                if unsharded is not None and sharded is not None:
                    out[id(unsharded)] = sharded
    return out


def _fsdp_params(module: torch.nn.Module) -> list[Any]:
    """The ``FSDPParam`` records of ``module``'s FSDP2 state (none when it has none)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if not callable(get_state):
        return []
    state = get_state()
    # Recent torch may keep several parameter groups per state; earlier versions one.
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return [p for group in groups for p in getattr(group, "fsdp_params", ())]


class FSDP2Adapter(Adapter):
    """FSDP2's parameters are DTensors (the ``DTensorAdapter`` places them); what FSDP2 adds is
    the unsharded parameter it puts on a module while its parameters are gathered."""

    engine = "FSDP2"

    def stepped_twins(self, modules: Sequence[torch.nn.Module]) -> dict[int, torch.Tensor]:
        return sharded_twins(modules)
