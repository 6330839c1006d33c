"""What regcollect reads off an optimizer object: the optimizer that really steps, and what a
gradient scaler passes to it. Engines are asked through ``regcollect._distributed.seam``.

Wrappers hold the optimizer their ``step()`` drives under a handful of names: accelerate's
``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` as ``.optimizer``, SAM (and
most sharpness-aware variants) as ``.base_optimizer``, timm's ``Lookahead`` as
``._base_optimizer``. The penalty belongs to that inner optimizer's step: it is the one real
update, once per training step, whatever the wrapper does around it.
"""

from __future__ import annotations

from typing import Any

import torch

from .._distributed import seam

__all__ = ["INNER_NAMES", "groups_key", "inner", "skip_flag", "stepped"]

INNER_NAMES = ("optimizer", "base_optimizer", "_base_optimizer")


def groups_key(optimizer: torch.optim.Optimizer) -> tuple[tuple[int, int], ...]:
    """What the set of parameters ``optimizer`` holds depends on, cheaply: each parameter
    group's list and its length (``add_param_group`` adds a group)."""
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def inner(optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer ``optimizer`` wraps and steps, or None for a plain optimizer."""
    for name in INNER_NAMES:
        candidate = getattr(optimizer, name, None)
        if isinstance(candidate, torch.optim.Optimizer) and candidate is not optimizer:
            return candidate
    return None


def stepped(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost optimizer ``optimizer`` steps, which must have step hooks.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, or the innermost one never ran
            ``Optimizer.__init__`` (so ``step()`` runs no hooks) and wraps no optimizer under
            a known name.
    """
    current = seam.stepped(optimizer)  # an engine object given as the optimizer
    for _ in range(8):
        _refuse_engine(current)
        nested = inner(current)
        if nested is None:
            break
        current = nested
    else:  # nested deeper than that: the last one is checked too
        _refuse_engine(current)
    if not isinstance(current, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, or a wrapper that steps one it holds "
            f"as {', '.join('.' + n for n in INNER_NAMES)}; got {type(optimizer).__name__}"
        )
    if not hasattr(current, "_optimizer_step_pre_hooks"):
        raise TypeError(
            f"optimizer {type(current).__name__} has no step hooks (it never ran "
            "torch.optim.Optimizer.__init__) and holds no optimizer as "
            f"{', '.join('.' + n for n in INNER_NAMES)}: attach the optimizer its step() "
            "drives instead (rc.attach_optimizer(base_optimizer))"
        )
    return current


def _refuse_engine(optimizer: Any) -> None:
    """Engines whose optimizer holds flat copies of the parameters, not the parameters: the
    step could not find a regularized parameter in it and would silently apply nothing.

    Raises:
        ValueError: A DeepSpeed ZeRO optimizer; an optimizer holding FSDP1 flat parameters
            (``use_orig_params=False``).
    """
    message = seam.refuse_step(optimizer)
    if message is not None:
        raise ValueError(message)


def skip_flag(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """``found_inf`` as ``GradScaler.step`` passes it to optimizers that unscale inside their
    own step (``fused=True``): nonzero when this step is skipped. None otherwise (then a
    skipped step never calls ``step()``)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf if isinstance(found_inf, torch.Tensor) else None
