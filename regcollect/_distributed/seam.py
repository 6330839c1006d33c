"""The one seam between regcollect and the distributed engines: every question about where a
tensor's values are, or what an engine does to parameters and optimizers, is asked here, and
answered by the engines' adapters in turn (one module each: ``dtensor``, ``zero3``,
``fsdp1``, ``ddp``). Adding an engine is adding its adapter to ``ADAPTERS``.

A tensor no adapter claims is placed by its class alone (``placement.by_type``): an unknown
tensor subclass that decides its own values is refused, never computed per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .ddp import DDPAdapter
from .dtensor import DTensorAdapter
from .dtensor_step import local_lists
from .fsdp1 import FSDP1Adapter
from .fsdp2 import FSDP2Adapter
from .placement import PLAIN, Adapter, Placed, Placement, by_type
from .zero3 import Zero3Adapter

__all__ = [
    "ADAPTERS",
    "engine_in_parts",
    "held_away",
    "holds",
    "is_plain",
    "place",
    "real_shape",
    "refuse_step",
    "step_lists",
    "stepped",
    "stepped_twins",
    "unstepped",
]

# The attached step's lists on this rank: plain tensors as they are, the others' local
# tensors, by their engines' rules (dtensor_step).
step_lists = local_lists

# In the order they are asked: an engine that holds parameters in parts before DDP, which
# wraps any of them.
ADAPTERS: tuple[Adapter, ...] = (
    DTensorAdapter(),
    FSDP2Adapter(),
    Zero3Adapter(),
    FSDP1Adapter(),
    DDPAdapter(),
)


def _unnamed() -> str:
    return "a tensor"


def place(
    tensor: torch.Tensor | None,
    module: torch.nn.Module | None = None,
    name: str | None = None,
    describe: Callable[[], str] = _unnamed,
) -> Placed | None:
    """The tensor a plan evaluates for ``module``'s parameter ``name`` (now ``tensor``; or a
    bare tensor, ``module`` None) and its placement; None when there is no tensor now.

    Raises:
        ValueError: An engine took the parameter out of its module and holds it nowhere.
    """
    for adapter in ADAPTERS:
        found = adapter.place(tensor, module, name, describe)
        if found is not None:
            return found
    return None if tensor is None else (tensor, by_type(tensor))


def placement_of(x: torch.Tensor) -> Placement:
    """The placement of a bare tensor (no module: nothing is routed, nothing held in parts
    found by name)."""
    found = place(x)
    return PLAIN if found is None else found[1]


def is_plain(x: torch.Tensor) -> bool:
    """Whether ``x`` holds all its values here as an ordinary tensor does (stackable)."""
    return placement_of(x).plain


def engine_in_parts(
    tensor: torch.Tensor | None, module: torch.nn.Module | None, name: str | None
) -> str | None:
    """The engine holding ``module``'s parameter ``name`` (now ``tensor``) in parts that no
    rank gathers for a penalty, for messages; None when none does."""
    # Loops, not next() with a default: dynamo before torch 2.7 cannot trace that.
    for adapter in ADAPTERS:
        engine = adapter.in_parts(tensor, module, name)
        if engine is not None:
            return engine
    return None


def holds(module: torch.nn.Module, name: str) -> bool:
    """Whether an engine holds ``module``'s parameter ``name`` after taking it out."""
    return any(a.holds(module, name) for a in ADAPTERS)


def held_away(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``(module, name)`` of the parameters under ``model`` engines took out of their
    modules, in the engines' order."""
    return [found for a in ADAPTERS for found in a.held_away(model)]


def real_shape(
    module: torch.nn.Module, name: str, tensor: torch.Tensor | None
) -> torch.Size | None:
    """The shape the model gave ``module``'s parameter ``name`` (now ``tensor``, maybe a flat
    part or None); None for a missing parameter no engine holds."""
    for adapter in ADAPTERS:
        shape = adapter.real_shape(tensor, module, name)
        if shape is not None:
            return shape
    return None if tensor is None else tensor.shape


def stepped(optimizer: Any) -> Any:
    """What ``optimizer`` steps when it is an engine object (a ``DeepSpeedEngine``), else
    ``optimizer``."""
    for adapter in ADAPTERS:
        inner = adapter.stepped(optimizer)
        if inner is not None:
            return inner
    return optimizer


def refuse_step(optimizer: Any) -> str | None:
    """Why the attached step cannot apply penalties through ``optimizer`` (an engine's
    optimizer holding flat copies of the parameters), or None."""
    for adapter in ADAPTERS:
        message = adapter.refuse_step(optimizer)
        if message is not None:
            return message
    return None


def unstepped(tensor: torch.Tensor, regularizer: object, terms: Sequence[Any]) -> str | None:
    """Why a decoupled step cannot apply ``regularizer`` to ``tensor`` exactly (the end of an
    error naming the parameter), when an engine's rule says so; else None."""
    for adapter in ADAPTERS:
        message = adapter.unstepped(tensor, regularizer, terms)
        if message is not None:
            return message
    return None


def stepped_twins(modules: Sequence[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """``id(object) -> the tensor the optimizer steps`` for the parameter objects engines put
    on ``modules`` in its place (FSDP2's unsharded parameters)."""
    out: dict[int, torch.Tensor] = {}
    for adapter in ADAPTERS:
        out.update(adapter.stepped_twins(modules))
    return out
