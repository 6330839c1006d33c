"""FSDP1 (``FullyShardedDataParallel``) as regcollect meets it: which wrapper and flat
parameter hold a module's parameter, and the shape it had before FSDP1 flattened it.

FSDP1 is recognised by its class name and package, so nothing is imported here.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _naming

__all__ = ["inside_fsdp1", "is_fsdp1", "owner", "real_shape"]


def is_fsdp1(module: torch.nn.Module) -> bool:
    return any(
        cls.__name__ == "FullyShardedDataParallel"
        and cls.__module__.startswith("torch.distributed.fsdp")
        for cls in type(module).__mro__
    )


def inside_fsdp1(module: torch.nn.Module) -> bool:
    return any(is_fsdp1(m) for m in [module, *_naming.ancestors(module)])


def owner(module: torch.nn.Module, name: str) -> tuple[Any, int] | None:
    """``(FSDP1 handle, index of the parameter in its flat parameter)`` for ``module``'s
    parameter ``name``, found in the nearest wrapper whose flat parameter holds it (by its
    module and name, which FSDP1 keeps in every state)."""
    for wrapper in [module, *_naming.ancestors(module)]:
        if not is_fsdp1(wrapper):
            continue
        flat = getattr(getattr(wrapper, "_handle", None), "flat_param", None)
        for i, info in enumerate(getattr(flat, "_param_infos", None) or ()):
            if info.module is module and info.param_name == name:
                return wrapper._handle, i
    return None


def real_shape(module: torch.nn.Module, name: str, param: torch.Tensor | None) -> torch.Size | None:
    """The shape a parameter had before FSDP1 flattened it (``use_orig_params=True``: a flat
    view; ``param`` None: gone into a flat parameter, ``use_orig_params=False``); None for a
    missing parameter no flat parameter holds."""
    if param is not None and not getattr(param, "_fsdp_flattened", False):
        return param.shape
    found = owner(module, name)
    if found is None:
        return None if param is None else param.shape
    handle, i = found
    return torch.Size(handle.flat_param._shapes[i])


def flattened_away(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``(module, name)`` of the parameters FSDP1 (``use_orig_params=False``) took out of the
    modules under ``model`` into flat parameters, in the flat parameters' order."""
    out = []
    for module in model.modules():
        if not is_fsdp1(module):
            continue
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        for info in getattr(flat, "_param_infos", None) or ():
            if info.module._parameters.get(info.param_name) is None:
                out.append((info.module, info.param_name))
    return out
