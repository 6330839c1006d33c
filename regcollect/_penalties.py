"""Penalty math: one small class per penalty, each a formula on one tensor.

Every regularizer maps a tensor ``x`` to a 0-dim penalty tensor on ``x``'s device, computed in
float32 at least (so float16/bfloat16 weights never overflow) and differentiable. This module
imports only torch; ``regcollect.regularizers`` adds the factories, the registry and
(de)serialisation, and re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .schedules import Coefficient, Schedule, check_coefficient, coefficient, scale

__all__ = [
    "Coefficient",
    "Custom",
    "L1",
    "L1L2",
    "L2",
    "Regularizer",
    "accumulation_dtype",
    "check_coefficient",
    "coefficient",
    "evaluated",
    "fused_terms",
    "scale",
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


class Regularizer:
    """Base class: ``__call__(x) -> 0-dim tensor``, ``get_config()``, ``from_config(config)``.

    Subclasses that are sums of ``c * sum(abs(x))`` and ``c * sum(x**2)`` terms report them in
    ``terms``, which lets the engine compute many of them at once with multi-tensor kernels.
    Any other subclass is simply called on each tensor.

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

    # Whether attach_optimizer applies this penalty in the optimizer step (besides the sums
    # of L1/L2 terms, which it always does).
    applied_in_step = False

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

    def terms(self) -> tuple[tuple[str, Coefficient], ...] | None:
        """How the engine may compute this penalty with multi-tensor kernels.

        Returns:
            ``(("l1", c1), ("l2", c2), ...)`` when the penalty is a sum of such terms
            (``c * sum(abs(x))``, ``c * sum(x**2)``), else None.
        """
        return None

    def schedules(self) -> list[Schedule]:
        """The schedules among this regularizer's coefficients.

        Returns:
            The ``Schedule`` objects among its attributes (empty for constant coefficients).
        """
        return [v for v in vars(self).values() if isinstance(v, Schedule)]

    # -- hooks for penalties that need more than the tensor ------------------------------

    def on_attach(self, module: torch.nn.Module, name: str) -> None:
        """Called when registered on ``module``'s parameter ``name`` (``L2SP`` keeps its
        reference there). The default does nothing.

        Args:
            module: The module that owns the parameter.
            name: The parameter's name in ``module``.
        """

    def on_detach(self, module: torch.nn.Module, name: str) -> None:
        """Called when no longer registered on ``module``'s parameter ``name``. The default
        does nothing.

        Args:
            module: The module that owns the parameter.
            name: The parameter's name in ``module``.
        """

    def for_parameter(self, module: torch.nn.Module, name: str | None) -> Regularizer:
        """The regularizer ``loss()`` evaluates on ``module``'s parameter ``name``.

        Args:
            module: The module the entry is registered on.
            name: The parameter's name, or None for an activity entry.

        Returns:
            ``self`` by default; ``Orthogonal`` transposes Keras-layout kernels and ``L2SP``
            binds the parameter's reference.
        """
        return self

    def batch_key(self, x: torch.Tensor) -> Any:
        """Whether the engine may evaluate this penalty for many tensors at once.

        Args:
            x: The tensor the penalty is about to be evaluated on.

        Returns:
            A hashable key (tensors of one device and dtype sharing it go to one ``batch``
            call), or None to call the regularizer on each tensor.
        """
        return None

    @classmethod
    def batch(
        cls, xs: list[torch.Tensor], regularizers: list[Regularizer]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate the penalty on tensors that share a ``batch_key``.

        Args:
            xs: The tensors.
            regularizers: The regularizer for each tensor, in the same order.

        Returns:
            ``(total, per-tensor values)``: a 0-dim tensor and a 1-D tensor of ``len(xs)``.

        Raises:
            NotImplementedError: The class returns None from ``batch_key`` (the default).
        """
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


def fused_terms(regularizer: Regularizer) -> tuple[tuple[str, Coefficient], ...] | None:
    """``regularizer.terms()``, unless a subclass overrides ``__call__`` below the class that
    defined ``terms()``: its formula is then its own, and the engine must call it."""
    mro = type(regularizer).__mro__
    terms_owner = next(c for c in mro if "terms" in c.__dict__)
    call_owner = next(c for c in mro if "__call__" in c.__dict__)
    if call_owner is not terms_owner and issubclass(call_owner, terms_owner):
        return None
    return regularizer.terms()


def _abs_sum(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum(dtype=accumulation_dtype(x.dtype))


def _square_sum(x: torch.Tensor) -> torch.Tensor:
    # Upcast before squaring: a float16 weight of 300 squares to inf in float16.
    x = x.to(accumulation_dtype(x.dtype))
    return (x * x).sum()


def zero_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=accumulation_dtype(x.dtype), device=x.device)


class L1(Regularizer):
    """``l1 * sum(abs(x))``.

    Args:
        l1: The coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> float(L1(0.01)(torch.ones(5, 5)))
        0.25
    """

    def __init__(self, l1: Coefficient = 0.01) -> None:
        self.l1 = coefficient("l1", l1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L1")
        return scale(self.l1, x) * _abs_sum(x)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}

    def terms(self) -> tuple[tuple[str, Coefficient], ...]:
        return (("l1", self.l1),)


class L2(Regularizer):
    """``l2 * sum(x**2)`` (Keras scaling; ``SGD(weight_decay=wd)`` equals ``L2(wd / 2)``).

    The equality holds for parameters the data loss reaches: the optimizer skips a parameter
    whose ``.grad`` is None, while ``loss()`` reaches every regularized one (see the
    weight-decay migration guide).

    Args:
        l2: The coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> round(float(L2(0.01)(torch.full((2, 2), 3.0))), 6)
        0.36
    """

    def __init__(self, l2: Coefficient = 0.01) -> None:
        self.l2 = coefficient("l2", l2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L2")
        return scale(self.l2, x) * _square_sum(x)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}

    def terms(self) -> tuple[tuple[str, Coefficient], ...]:
        return (("l2", self.l2),)


class L1L2(Regularizer):
    """``l1 * sum(abs(x)) + l2 * sum(x**2)``; both default to 0 as in Keras's class.

    Args:
        l1: The L1 coefficient (a float >= 0 or a schedule).
        l2: The L2 coefficient (a float >= 0 or a schedule).

    Raises:
        ValueError: A negative, NaN or infinite coefficient.
        TypeError: A coefficient that is not a number or a schedule.

    Examples:
        >>> float(L1L2(l1=0.5, l2=0.25)(torch.tensor([2.0])))  # 0.5*2 + 0.25*4
        2.0
    """

    def __init__(self, l1: Coefficient = 0.0, l2: Coefficient = 0.0) -> None:
        self.l1 = coefficient("l1", l1)
        self.l2 = coefficient("l2", l2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L1L2")
        result = zero_like(x)
        if self.l1:  # a schedule always counts: it may be zero now, not later
            result = result + scale(self.l1, x) * _abs_sum(x)
        if self.l2:
            result = result + scale(self.l2, x) * _square_sum(x)
        return result

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}

    def terms(self) -> tuple[tuple[str, Coefficient], ...]:
        return (("l1", self.l1), ("l2", self.l2))


def evaluated(
    regularizer: Regularizer, module: torch.nn.Module | None, param: str | None
) -> Regularizer:
    """The regularizer ``loss()`` applies to ``module``'s parameter ``param``: an
    ``Orthogonal`` with Keras's mode names on a ``Linear``/recurrent weight is applied to
    its transpose (Keras's kernel layout), an ``L2SP`` is bound to the parameter's
    reference; see ``Regularizer.for_parameter``."""
    if module is None:
        return regularizer
    return regularizer.for_parameter(module, param)


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
