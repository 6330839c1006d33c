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

__all__ = [
    "INNER_NAMES",
    "by_graph",
    "check_learning_rates",
    "first_decay",
    "groups_key",
    "inner",
    "lr_of",
    "skip_flag",
    "skipped",
    "stepped",
]

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


def skipped(optimizer: torch.optim.Optimizer) -> tuple[bool, torch.Tensor | None]:
    """Whether ``GradScaler`` skips this step of a fused optimizer: ``(True, None)`` when
    known on the host (a CPU flag), else ``(False, keep)`` with ``keep = 1 - found_inf`` on
    the device, which the step math multiplies in (no host read)."""
    found_inf = skip_flag(optimizer)
    if found_inf is None:
        return False, None
    if found_inf.device.type == "cpu":
        return bool(found_inf.item()), None
    return False, 1.0 - found_inf.clamp(max=1.0)


def lr_of(group: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The group's learning rate for the decoupled step: a float, or a device tensor kept on
    its device (a capturable optimizer's; reading it on the host would sync every step)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" else lr
    if lr is None:
        raise ValueError(_no_lr(optimizer))
    return float(lr)


def _no_lr(optimizer: torch.optim.Optimizer) -> str:
    return (
        f"decoupled=True needs a learning rate: {type(optimizer).__name__} has a parameter "
        "group with lr=None (it computes its own step size, as Adafactor's relative_step "
        "does). Attach it coupled (decoupled=False), which needs no learning rate."
    )


def check_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    if any(g.get("lr") is None for g in optimizer.param_groups):
        raise ValueError(_no_lr(optimizer))


def first_decay(optimizer: torch.optim.Optimizer) -> float:
    return next(
        (float(g["weight_decay"]) for g in optimizer.param_groups if g.get("weight_decay")), 0.0
    )


def by_graph(
    params: list[torch.Tensor], where: list[Any]
) -> tuple[tuple[list[torch.Tensor], list[Any]], tuple[list[torch.Tensor], list[Any]]]:
    """``(params, where)`` split into those whose gradient is a plain tensor and those whose
    gradient carries a graph (``backward(create_graph=True)``)."""
    if not any(p.grad is not None and p.grad.grad_fn is not None for p in params):
        return (params, where), ([], [])
    plain: tuple[list[torch.Tensor], list[Any]] = ([], [])
    deep: tuple[list[torch.Tensor], list[Any]] = ([], [])
    for p, w in zip(params, where):
        side = deep if p.grad is not None and p.grad.grad_fn is not None else plain
        side[0].append(p)
        side[1].append(w)
    return plain, deep
