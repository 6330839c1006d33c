"""The base of every penalty: a Keras-small ``Regularizer``, ``Custom`` for a function, and
``Term``, one additive part of a penalty as the engine and the optimizer step compute it.

A penalty lives in one module with everything it needs: its class (its value), its terms and
step math (``Term``), its kernel (``regcollect._penalties.kernel``: what the machinery asks
beyond the value) and its per-module state. ``L1``/``L2``/``L1L2`` are in ``l1l2``, ``L2SP``
in ``l2sp``, ``GroupLasso`` in ``group_lasso``, ``Orthogonal`` in ``orthogonal``. This module
imports only torch and the schedules' coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .coefficients import Coefficient, check_coefficient, coefficient, scale

__all__ = [
    "Coefficient",
    "Custom",
    "Regularizer",
    "RegularizerArg",
    "Term",
    "accumulation_dtype",
    "check_coefficient",
    "check_tensor",
    "coefficient",
    "scale",
    "zero_like",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype penalties of a ``dtype`` tensor are computed in: float32 at least."""
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def check_tensor(x: object, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{who} expects a real tensor, got dtype {x.dtype}")
    return x


def zero_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=accumulation_dtype(x.dtype), device=x.device)


class Term:
    """One additive part of a penalty, as the engine and an attached optimizer's step see it.

    Each penalty module defines its own next to the penalty. The step methods get lists of
    parameters (with a gradient this step) of one parameter group, and the ``coef`` the part
    had when the step began; ``grad_scale`` is a fused optimizer's ``GradScaler`` scale (the
    coupled gradient goes in scaled, as the optimizer will divide by it) and ``keep`` is
    ``1 - found_inf`` on the device (0 on a step the scaler skips) or None.

    Attributes:
        p: 1 or 2 when the part is ``coef * sum(|x|**p)`` (the grouped kernels compute it);
            None when the penalty computes its value itself (``_batch``, ``__call__``).
        local: The step math is elementwise, so it applies shard by shard to a sharded
            tensor, however it is cut (``shardable``).
    """

    p: int | None = None
    local = False

    def shardable(self, cut: frozenset[int], ndim: int) -> bool:
        """Whether the step math, applied to each rank's piece of a tensor of ``ndim``
        dimensions cut along the dimensions ``cut`` (a DTensor's shards), is the whole
        tensor's: always for elementwise math (``local``); otherwise only uncut (each rank
        holding all of it)."""
        return self.local or not cut

    def locate(self, module: torch.nn.Module | None, name: str | None) -> Any:
        """Per-parameter state the step needs (L2-SP: where its reference lives)."""
        return None

    def coupled_(
        self,
        coef: float,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        where: list[Any],
        *,
        sign: float,
        grad_scale: torch.Tensor | None,
    ) -> None:
        """``grad += sign * grad_scale * d(coef * part)/dw`` in place (coupled mode)."""
        raise NotImplementedError(f"{type(self).__name__} has no coupled step")

    def before_(
        self,
        coef: float,
        lr: float | torch.Tensor,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """Decoupled mode, before the optimizer's update (L2's decay). Nothing by default."""

    def after_(
        self,
        coef: float,
        lr: float | torch.Tensor,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """Decoupled mode, after the optimizer's update (a proximal step). Nothing by
        default."""


class Regularizer:
    """Base class: ``__call__(x) -> 0-dim tensor``, ``get_config()``, ``from_config(config)``.

    A subclass is called on each tensor. What the engine and the optimizer step need beyond
    the value is the class's kernel (``regcollect._penalties.kernel``), not methods here; a
    subclass of a built-in penalty that defines its own ``__call__`` is its own formula.

    Examples:
        >>> import torch, regcollect as rc
        >>> class MaxAbs(rc.Regularizer):
        ...     def __init__(self, c=0.01):
        ...         self.c = c
        ...     def __call__(self, x):
        ...         return self.c * x.abs().max()
        ...     def get_config(self):
        ...         return {"c": self.c}
        >>> float(MaxAbs(0.5)(torch.tensor([1.0, -4.0])))
        2.0
        >>> MaxAbs.from_config(MaxAbs(0.5).get_config())
        MaxAbs(c=0.5)
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, so that ``from_config(get_config())`` rebuilds it.

        Returns:
            A dict of JSON-safe values (schedules are serialised by ``serialize``).

        Raises:
            NotImplementedError: The subclass does not implement it (it cannot be saved).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_config() to be serialised"
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        """Rebuild a regularizer from ``get_config()``'s output.

        Args:
            config: The constructor's keyword arguments.

        Returns:
            ``cls(**config)``.
        """
        return cls(**config)

    def __repr__(self) -> str:
        try:
            config = self.get_config()
        except NotImplementedError:
            return f"{type(self).__name__}()"
        args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        try:
            return bool(self.get_config() == other.get_config())  # type: ignore[attr-defined]
        except NotImplementedError:
            return self is other

    def __hash__(self) -> int:
        # Equal regularizers (same class, equal configs) must hash alike: the class and the
        # config's keys, which equal configs share, whatever their values' hashability.
        try:
            config = self.get_config()
        except NotImplementedError:
            return id(self)
        return hash((type(self), tuple(sorted(config))))


class Custom(Regularizer):
    """Wraps any callable ``f(tensor) -> 0-dim tensor`` so it behaves like a regularizer.

    The result is checked (a real 0-dim tensor on the input's device) and upcast to float32 at
    least. Custom regularizers cannot be serialised; subclass ``Regularizer`` and
    ``register`` it for that.

    Args:
        fn: The penalty function.

    Raises:
        TypeError: ``fn`` is not callable; when called, it returned no tensor.
        ValueError: When called, it returned a tensor that is not a scalar or is on
            another device than its input.

    Examples:
        >>> import torch, regcollect as rc
        >>> reg = rc.regularizers.get(lambda w: 0.1 * w.abs().max())   # wrapped in Custom
        >>> reg
        Custom(<lambda>)
        >>> round(float(reg(torch.tensor([1.0, -3.0]))), 6)
        0.3
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"Custom expects a callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, repr(self))
        result = self.fn(x)
        if not isinstance(result, torch.Tensor):
            raise TypeError(
                f"custom regularizer {self!r} must return a torch.Tensor, "
                f"got {type(result).__name__}"
            )
        if result.numel() != 1:
            raise ValueError(
                f"custom regularizer {self!r} must return a scalar tensor, "
                f"got shape {tuple(result.shape)}"
            )
        if result.device != x.device:
            raise ValueError(
                f"custom regularizer {self!r} returned a tensor on {result.device}, "
                f"expected the input's device {x.device}"
            )
        return result.reshape(()).to(accumulation_dtype(result.dtype))

    def get_config(self) -> dict[str, Any]:
        """Custom regularizers wrap code, which is not configuration.

        Returns:
            Never returns.

        Raises:
            NotImplementedError: Always; subclass ``Regularizer`` and ``register`` it.
        """
        raise NotImplementedError(
            f"custom regularizer {self!r} wraps a function and cannot be serialised; "
            "subclass regcollect.Regularizer and decorate it with @regcollect.register(name)"
        )

    def __repr__(self) -> str:
        return f"Custom({getattr(self.fn, '__qualname__', None) or type(self.fn).__name__})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.fn is self.fn

    def __hash__(self) -> int:
        return id(self.fn)


# What a regularizer argument accepts (``regularizers.get``): a regularizer, its name, its
# config dict, a factory or class passed uncalled (``rc.l2``), a function of the tensor (a
# Keras regularizer object is one), or None.
RegularizerArg = (
    Regularizer
    | str
    | dict[str, Any]
    | Callable[..., Regularizer]
    | Callable[[torch.Tensor], torch.Tensor]
    | None
)
