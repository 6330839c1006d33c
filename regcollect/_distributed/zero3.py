"""DeepSpeed ZeRO-3 as regcollect meets it: the adapter.

Outside the forward pass a rank holds only its partition of each parameter (its
``ds_tensor``); the engine reduces the gradient itself. L1/L2 penalties are evaluated on the
partition (``regcollect._distributed.held``); penalties needing the whole tensor are refused.
ZeRO's optimizers update flat partitions, not the parameters, so the attached step is refused
through them, and a ``DeepSpeedEngine`` given as the optimizer means the optimizer it steps.

DeepSpeed is recognised by the attributes it puts on parameters and by its classes' names, so
nothing is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .held import HELD, Held, Part
from .placement import Adapter, Placed

__all__ = ["Zero3Adapter"]


def _partitioned(tensor: object) -> bool:
    return hasattr(tensor, "ds_numel") and hasattr(tensor, "ds_status")


class _Zero3(Held):
    engine = "DeepSpeed ZeRO-3"

    def local(self) -> torch.Tensor:
        param = self._param()
        assert param is not None
        return param.ds_tensor.detach().view(-1)[: self.numel]  # type: ignore[attr-defined]


def _part(param: Any, describe: Callable[[], str]) -> Part:
    """All of this rank's partition of ``param``, named (for errors) when first seen."""
    held = getattr(param, HELD, None)
    if held is None:
        group = param.ds_process_group
        size = param.ds_tensor.numel()
        start = dist.get_rank(group) * size
        numel = max(0, min(size, param.ds_numel - start))
        held = _Zero3(param, start, numel, dist.get_world_size(group), group, describe())
        setattr(param, HELD, held)
    return Part(held, 0, held.numel)


class Zero3Adapter(Adapter):
    engine = _Zero3.engine

    def place(
        self,
        tensor: torch.Tensor | None,
        module: torch.nn.Module | None,
        name: str | None,
        describe: Callable[[], str],
    ) -> Placed | None:
        return _part(tensor, describe).placed() if _partitioned(tensor) else None

    def in_parts(
        self, tensor: torch.Tensor | None, module: torch.nn.Module | None, name: str | None
    ) -> str | None:
        return self.engine if _partitioned(tensor) else None

    def real_shape(
        self, tensor: torch.Tensor | None, module: torch.nn.Module, name: str
    ) -> torch.Size | None:
        return torch.Size(tensor.ds_shape) if _partitioned(tensor) else None  # type: ignore[union-attr]

    def stepped(self, optimizer: Any) -> Any | None:
        # A DeepSpeedEngine given as the optimizer: what it steps is its .optimizer.
        return optimizer.optimizer if type(optimizer).__name__ == "DeepSpeedEngine" else None

    def refuse_step(self, optimizer: Any) -> str | None:
        cls = type(optimizer)
        if not (cls.__module__.startswith("deepspeed.") and "Zero" in cls.__name__):
            return None
        return (
            f"attach_optimizer cannot apply penalties inside DeepSpeed ({cls.__name__}): its "
            "optimizer updates flat partitions of the parameters, not the parameters "
            "regcollect regularizes. Add the penalty to the loss instead, after the forward pass "
            "(engine.backward(criterion(engine(x), y) + rc.loss())), which is exact under "
            "every ZeRO stage."
        )
