"""Where a regularized tensor's values are: the vocabulary the plans, the registry and the
optimizer side ask, in the spirit of DTensor's placements, and the protocol each engine's
adapter implements (``regcollect._distributed.seam`` asks the adapters).

A ``Placement`` says, for one tensor a plan evaluates:

- ``local(x)``: this rank's values, differentiable, their gradient reaching the parameter by
  the engine's route (a DTensor's local shard, the part of a parameter an engine holds, a DDP
  parameter's gradient around ``Join``'s average);
- ``reduce_over``: the process-group axes ``((mesh, dim), ...)`` over which an elementwise
  sum of the local values is completed (one all-reduce per set of axes,
  ``regcollect._distributed.sharding``); ``()``: the local values are the whole tensor's;
  None: local sums cannot be completed (a DTensor with a ``Partial`` placement);
- ``whole(x)``: the whole tensor, differentiable, for a penalty that is no elementwise sum;
  None where no rank can have it (a part an engine holds): such penalties are refused,
  naming the engine;
- ``plain``: an ordinary tensor holding all its values here, which may be stacked with
  others of its shape and given to the batched kernels;
- ``refused``: why no penalty can be computed on it at all (an unknown tensor subclass);
- ``steps``: the engine's own rule for whether the attached step's math applies to the local
  values (a DTensor's, by its placements and the terms' ``shardable``).

``kind`` and ``reduce_over`` together are what tensors must share to go into one kernel
call. Nothing here imports an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Adapter",
    "PLAIN",
    "Placed",
    "Placement",
    "TAGGED",
    "by_type",
    "identity",
    "parts_message",
]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True, eq=False)
class Placement:
    """How one tensor's values lie across the ranks; see the module docstring."""

    kind: str
    engine: str = ""
    local: Callable[[torch.Tensor], torch.Tensor] = identity
    reduce_over: tuple[Any, ...] | None = ()
    whole: Callable[[torch.Tensor], torch.Tensor] | None = identity
    plain: bool = False
    refused: str = ""
    # The engine's parameter holding a tensor gone from its module (an FSDP1 flat parameter).
    holder: torch.Tensor | None = None
    # Whether ``local`` is more than the identity: a plain field, not a comparison of
    # functions, which dynamo before torch 2.7 cannot fold into a constant while it traces.
    needs_local: bool = False
    # Whether the attached step's math of the given terms, applied to the local values, is
    # the whole tensor's (a DTensor's rule, by its placements); None: ``elementwise`` decides.
    steps: Callable[[torch.Tensor, Sequence[Any]], bool] | None = None

    @property
    def elementwise(self) -> bool:
        """Whether an elementwise sum of the tensor is completed from local values (and the
        attached step's elementwise math applies to the local values as they are)."""
        return self.reduce_over is not None and not self.refused


# A Tensor or Parameter (or a subclass of Parameter that only tags it): all here, stackable.
PLAIN = Placement("plain", plain=True)
# A subclass with a __torch_function__ (or, in one process, a __torch_dispatch__) of its own:
# all here, not stacked with other tensors.
TAGGED = Placement("tagged")


def _several_ranks() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


# A tensor stand-in and where its values are; None for an entry with no tensor now.
Placed = tuple[torch.Tensor, Placement]

_NO_DISPATCH = torch.Tensor.__torch_dispatch__
_NO_FUNCTION = torch.nn.Parameter.__torch_function__


def by_type(x: torch.Tensor) -> Placement:
    """The placement of a tensor no engine's adapter recognises, from its class alone.

    ``Tensor`` and ``Parameter``, and subclasses of ``Parameter`` that only tag it: ``PLAIN``.
    A subclass with a ``__torch_function__`` of its own holds its values here but is not
    stacked with others: ``TAGGED``. A subclass with a ``__torch_dispatch__`` of its own (a
    wrapper subclass, as DTensor is) decides itself what its values are: in one process they
    are all here (torch's own FakeTensor under ``torch.export``, a MaskedTensor), but with
    several ranks whether this one holds them all cannot be told, and it is refused, never
    computed on one rank's values as if they were the whole.
    """
    cls = type(x)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return PLAIN
    if cls.__torch_dispatch__ is not _NO_DISPATCH and _several_ranks():
        return Placement(
            "refused",
            cls.__name__,
            whole=None,
            reduce_over=None,
            refused=(
                f"it is a {cls.__module__}.{cls.__qualname__}, a tensor subclass with a "
                "__torch_dispatch__ of its own that no regcollect engine adapter knows: whether "
                "this rank holds all its values cannot be told, and a penalty of part of them "
                "would differ from rank to rank. Regularize a plain tensor (or a DTensor), or "
                "freeze this one (requires_grad=False)"
            ),
        )
    function = cls.__torch_function__
    if cls.__torch_dispatch__ is not _NO_DISPATCH:
        return TAGGED
    if issubclass(cls, torch.nn.Parameter) and getattr(function, "__func__", function) is (
        _NO_FUNCTION
    ):
        return PLAIN
    return TAGGED


def parts_message(regularizer: object, engine: str) -> str:
    """Why ``regularizer`` cannot apply to a parameter ``engine`` holds in parts across the
    ranks (an FSDP1 shard, a ZeRO-3 partition)."""
    return (
        f"{engine} holds this parameter in parts across the ranks, and {regularizer!r} needs the "
        "whole tensor. Use fully_shard (FSDP2), where it is gathered, or L1/L2 penalties, which "
        f"are exact under {engine}"
    )


class Adapter:
    """One engine as regcollect meets it. Each method answers for that engine only, or gives
    the answer meaning "not mine" (None, False, an empty list).

    - ``place``: a tensor of this engine (``tensor`` None: a parameter gone from ``module``,
      held by the engine) and its placement, with the tensor a plan evaluates for it;
    - ``in_parts``: the engine's name, as it holds the parameter, when it holds it in parts no
      rank gathers for a penalty (only elementwise sums apply);
    - ``holds``: whether the engine holds ``module``'s parameter ``name`` after taking it out
      of the module;
    - ``held_away``: such parameters under ``model``, as ``(module, name)``;
    - ``real_shape``: the shape the model gave the parameter;
    - ``stepped``: the optimizer an engine object steps (None: not this engine's);
    - ``refuse_step``: why the attached step cannot apply penalties through ``optimizer``;
    - ``unstepped``: why a decoupled step cannot apply ``regularizer`` (step terms ``terms``)
      to a tensor of this engine exactly, for the error naming it;
    - ``stepped_twins``: ``id(object) -> the tensor the optimizer steps`` for parameter objects
      the engine puts on ``modules`` in its place (FSDP2's unsharded parameters).
    """

    engine = ""

    def place(
        self,
        tensor: torch.Tensor | None,
        module: torch.nn.Module | None,
        name: str | None,
        describe: Callable[[], str],
    ) -> Placed | None:
        return None

    def in_parts(
        self, tensor: torch.Tensor | None, module: torch.nn.Module | None, name: str | None
    ) -> str | None:
        return None

    def holds(self, module: torch.nn.Module, name: str) -> bool:
        return False

    def held_away(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
        return []

    def real_shape(
        self, tensor: torch.Tensor | None, module: torch.nn.Module, name: str
    ) -> torch.Size | None:
        return None

    def stepped(self, optimizer: Any) -> Any | None:
        return None

    def refuse_step(self, optimizer: Any) -> str | None:
        return None

    def unstepped(
        self, tensor: torch.Tensor, regularizer: object, terms: Sequence[Any]
    ) -> str | None:
        return None

    def stepped_twins(self, modules: Sequence[torch.nn.Module]) -> dict[int, torch.Tensor]:
        return {}
