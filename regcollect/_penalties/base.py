"""The base of every penalty, and the private protocol the engine and the step speak to it.

A penalty lives in one module with everything it needs: its value (``__call__``), the parts
the engine computes many tensors at once (``Term``), its step math for ``attach_optimizer``
(the same ``Term``), and its per-module state. ``L1``/``L2``/``L1L2`` are in
``regcollect._l1l2``, ``L2SP`` in ``regcollect._l2sp``, ``GroupLasso`` in
``regcollect._group_lasso``, ``Orthogonal`` in ``regcollect._orthogonal``. Adding a penalty
means adding one module; nothing else names it. This module imports only torch and the
schedules.

The protocol, all private (a Keras-facing ``Regularizer`` is ``__call__``, ``get_config``
and ``from_config``):

- ``_terms()``: the penalty as a sum of ``(Term, coefficient)`` parts, or ``()`` when it is
  only a formula (called on each tensor). A part whose ``Term.p`` is 1 or 2 is
  ``coef * sum(|x|**p)``, computed by the grouped kernels; the step applies every part.
- ``_batch_key(x)``/``_batch(xs, regularizers)``: many tensors at once, for penalties whose
  value is not a p-norm power (L2-SP, group lasso).
- ``_bind(module, name)``: the regularizer ``loss()`` evaluates on that parameter (L2-SP bound
  to its reference, an orthogonal penalty to Keras's kernel layout).
- ``_check(x)``: whether the penalty applies to ``x`` at all (a group lasso's axis, an
  orthogonal penalty's rank), asked at registration.
- ``_on_attach``/``_on_detach``: the penalty's state on the module (L2-SP's reference).
- ``_schedules()``: the schedules among its coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..schedules import Schedule
from .coefficients import Coefficient, check_coefficient, coefficient, scale

__all__ = [
    "Coefficient",
    "Custom",
    "Regularizer",
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
            tensor; otherwise the step applies it to plain tensors only.
    """

    p: int | None = None
    local = False

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

    A subclass is called on each tensor. The built-in penalties also speak the engine's
    private protocol (see ``regcollect._penalties``); a subclass of one of them that defines
    its own ``__call__`` is its own formula and is called, whatever it inherits.

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

    # -- the engine's private protocol (see the module docstring) ---------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass with its own formula is called, whatever parts or batched evaluation it
        # inherits (class MeanL2(rc.L2) with a __call__ of its own is not L2).
        if "__call__" in cls.__dict__:
            for name in ("_terms", "_batch_key"):
                if name not in cls.__dict__:
                    setattr(cls, name, getattr(Regularizer, name))

    def _terms(self) -> tuple[tuple[Term, Coefficient], ...]:
        """The penalty as ``(Term, coefficient)`` parts; ``()``: a formula only."""
        return ()

    def _check(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if the penalty cannot apply to ``x`` (called at registration,
        so that the error comes there, naming the entry, not at the first ``loss()``)."""

    def _schedules(self) -> list[Schedule]:
        """The ``Schedule`` objects among this regularizer's attributes."""
        return [v for v in vars(self).values() if isinstance(v, Schedule)]

    def _on_attach(self, module: torch.nn.Module, name: str) -> None:
        """Registered on ``module``'s parameter ``name``: keep state there (L2-SP)."""

    def _on_detach(self, module: torch.nn.Module, name: str) -> None:
        """No longer registered on ``module``'s parameter ``name``: drop that state."""

    def _bind(self, module: torch.nn.Module | None, name: str | None) -> Regularizer:
        """What ``loss()`` evaluates on ``module``'s parameter ``name`` (None: an output or
        a bare tensor)."""
        return self

    def _batch_key(self, x: torch.Tensor) -> Any:
        """A hashable key shared by tensors ``_batch`` may evaluate together, or None."""
        return None

    @classmethod
    def _batch(
        cls, xs: list[torch.Tensor], regularizers: list[Regularizer]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, per-tensor values)`` of tensors sharing a ``_batch_key``."""
        raise NotImplementedError(f"{cls.__name__} has no batched evaluation")

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
