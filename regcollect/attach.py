"""Attaching regularizers to any module, without subclassing it."""

from __future__ import annotations

import torch

from . import _naming
from .collection import Collection, Handle, active_collection, current_prefix
from .regularizers import Regularizer
from .regularizers import get as get_regularizer

__all__ = ["add_regularizer", "add_activity_regularizer"]


def _check_module(module: object, argument: str = "module") -> torch.nn.Module:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {type(module).__name__}")
    return module


def _required(regularizer: object) -> Regularizer:
    reg = get_regularizer(regularizer)
    if reg is None:
        raise ValueError(
            "regularizer must not be None: pass a Regularizer, a string, a dict or a callable"
        )
    return reg


def resolve_parameter(module: torch.nn.Module, param_name: object) -> tuple[torch.nn.Module, str]:
    """``(owning submodule, local name)`` for a dotted parameter name, or a clear error."""
    if not isinstance(param_name, str) or not param_name:
        raise TypeError(f"param_name must be a non-empty string, got {param_name!r}")
    path, _, local = param_name.rpartition(".")
    available = [name for name, _ in module.named_parameters()]
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        raise ValueError(
            f"{type(module).__name__} has no parameter {param_name!r}; "
            f"its parameters are {available}"
        ) from None
    if owner._parameters.get(local) is None:
        raise ValueError(
            f"{type(module).__name__} has no parameter {param_name!r}; "
            f"its parameters are {available}"
        )
    return owner, local


def add_regularizer(
    module: torch.nn.Module,
    param_name: str,
    regularizer: object,
    *,
    collection: Collection | None = None,
) -> Handle:
    """Penalise ``module``'s parameter ``param_name`` (dotted names reach into submodules).

    Registering again on the same parameter (or a parameter tied to it) replaces the previous
    regularizer in that collection.

    >>> import torch, regcollect as rc
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> handle = rc.add_regularizer(model, "0.weight", rc.l2(0.01))
    >>> handle.remove()
    """
    owner, local = resolve_parameter(_check_module(module), param_name)
    reg = _required(regularizer)
    coll = active_collection(collection)
    _naming.record_tree(module)
    return Handle([(coll, coll.add_weight(owner, local, reg, prefix=current_prefix()))])


def add_activity_regularizer(
    module: torch.nn.Module, regularizer: object, *, collection: Collection | None = None
) -> Handle:
    """Penalise ``module``'s output: ``regularizer(output) / batch_size`` on every forward pass
    made with gradients enabled, counted once by the next ``loss()``."""
    _check_module(module)
    reg = _required(regularizer)
    coll = active_collection(collection)
    _naming.record_tree(module)
    return Handle([(coll, coll.add_activity(module, reg, prefix=current_prefix()))])
