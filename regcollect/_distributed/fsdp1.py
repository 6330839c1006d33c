"""FSDP1 (``FullyShardedDataParallel``) as regcollect meets it: the adapter.

- ``use_orig_params=True``: each original parameter stays the same object, but outside the
  forward pass its data is a flat 1-D view of the part of it in this rank's shard (empty on the
  ranks holding none of it). Its L1/L2 penalties are sums over elements, so each rank computes
  them on its part and the value is completed with one all-reduce over the FSDP process group
  while the flat parameter is sharded. Its gradient is already right (each rank's part).
- ``use_orig_params=False``: the parameter is gone from its module into a flat parameter. The
  plan evaluates a stand-in for the elements of it in this rank's shard
  (``regcollect._distributed.held``), whose gradient goes through FSDP1's own reduction; an
  optimizer holding flat parameters cannot apply penalties to the parameters.

Penalties needing the whole tensor are refused on both. FSDP1 is recognised by its class name
and package, and its parameters by the attributes it puts on them, so nothing is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _naming
from .held import HELD, Held, Part
from .placement import PLAIN, Adapter, Placed, Placement
from .sharding import GroupAxis

__all__ = ["FSDP1Adapter"]


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


class _FlatShard(Held):
    engine = "FSDP1 (use_orig_params=False)"

    def local(self) -> torch.Tensor:
        flat = self._param()
        assert flat is not None
        # FSDP1 keeps the shard as _local_shard from its first forward pass on; before, the
        # flat parameter holds it (FSDP1 shards as it wraps).
        shard = getattr(flat, "_local_shard", flat)
        return shard.detach().view(-1)[: self.numel]


def _flat_part(handle: Any, index: int, describe: Callable[[], str]) -> Part:
    """The ``Part`` of the ``index``-th original parameter of an FSDP1 handle's flat parameter
    (``use_orig_params=False``): the elements of it in this rank's shard, maybe none. The
    parameter is named (for errors) only when the flat parameter is first seen."""
    flat = handle.flat_param
    held = getattr(flat, HELD, None)
    if held is None:
        sharded = handle.uses_sharded_strategy
        size = flat._sharded_size.numel()
        numel = size - (flat._shard_numel_padded if sharded else 0)
        start = handle.rank * size if sharded else 0
        factor = handle.world_size if sharded else 1
        what = f"the FSDP1 flat parameter holding {describe()}"
        held = _FlatShard(flat, start, numel, factor, handle.process_group, what)
        setattr(flat, HELD, held)
    info = flat._shard_param_infos[index]
    if not info.in_shard:
        return Part(held, 0, 0)
    return Part(held, info.offset_in_shard, info.offset_in_shard + info.numel_in_shard)


def _shard_view(tensor: torch.Tensor, module: torch.nn.Module | None, name: str | None) -> Placed:
    """A parameter FSDP1 flattened in place (``use_orig_params=True``): while its flat
    parameter is sharded, elementwise sums of it are completed over the FSDP process group;
    unsharded, it holds all its values."""
    found = owner(module, name or "") if module is not None else None
    if found is not None:
        handle = found[0]
        if handle.uses_sharded_strategy and handle.is_sharded(handle.flat_param):
            over = ((GroupAxis(handle.process_group), 0),)
            return tensor, Placement(
                "fsdp1 shard", FSDP1Adapter.engine, reduce_over=over, whole=None
            )
    return tensor, PLAIN


class FSDP1Adapter(Adapter):
    engine = "FSDP1"

    def place(
        self,
        tensor: torch.Tensor | None,
        module: torch.nn.Module | None,
        name: str | None,
        describe: Callable[[], str],
    ) -> Placed | None:
        if tensor is not None:
            flattened = getattr(tensor, "_fsdp_flattened", False)
            return _shard_view(tensor, module, name) if flattened else None
        if module is None or not inside_fsdp1(module):
            return None
        found = owner(module, name or "")
        if found is None:
            raise ValueError(
                f"{describe()}: FSDP1 (FullyShardedDataParallel) removed this parameter from "
                "its module, and no FSDP1 flat parameter holds it."
            )
        return _flat_part(*found, describe).placed()

    def in_parts(
        self, tensor: torch.Tensor | None, module: torch.nn.Module | None, name: str | None
    ) -> str | None:
        if tensor is None:
            inside = module is not None and inside_fsdp1(module)
            return _FlatShard.engine if inside else None
        return self.engine if getattr(tensor, "_fsdp_flattened", False) else None

    def holds(self, module: torch.nn.Module, name: str) -> bool:
        return owner(module, name) is not None

    def held_away(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
        return flattened_away(model)

    def real_shape(
        self, tensor: torch.Tensor | None, module: torch.nn.Module, name: str
    ) -> torch.Size | None:
        if tensor is not None and not getattr(tensor, "_fsdp_flattened", False):
            return None
        return real_shape(module, name, tensor)

    def refuse_step(self, optimizer: Any) -> str | None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not any(
            getattr(p, "_is_flat_param", False) for g in groups for p in g.get("params", ())
        ):
            return None
        return (
            f"attach_optimizer: {type(optimizer).__name__} holds FSDP1 flat parameters "
            "(FullyShardedDataParallel with use_orig_params=False), not the parameters "
            "regcollect regularizes. Add the penalty to the loss instead, after the forward "
            "pass (criterion(model(x), y) + rc.loss()), which is exact with flat parameters, "
            "or wrap with use_orig_params=True, where the attached step is exact too."
        )
