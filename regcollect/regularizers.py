"""Penalty math: Keras-style regularizers and their (de)serialisation.

Every regularizer maps a tensor ``x`` to a 0-dim penalty tensor on ``x``'s device, computed in
float32 at least (so float16/bfloat16 weights never overflow) and differentiable:

Examples:
    >>> import torch, regcollect as rc
    >>> float(rc.l2(0.1)(torch.tensor([1.0, 2.0])))   # 0.1 * (1 + 4)
    0.5
    >>> float(rc.l1(0.5)(torch.tensor([-1.0, 2.0])))  # 0.5 * (1 + 2)
    1.5

This module imports only torch: it knows nothing of modules or collections.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ._checks import keywords_checked, shown
from ._penalties import l2sp as _l2sp_module
from ._penalties.base import (
    Custom,
    Regularizer,
    accumulation_dtype,
    check_coefficient,
)

# What a regularizer argument accepts, for the signatures of the layers and functions above.
from ._penalties.base import RegularizerArg as RegularizerArg
from ._penalties.coefficients import CoefficientArg, serialize_schedule
from ._penalties.foreign import keras_config
from ._penalties.group_lasso import GroupLasso, group_lasso
from ._penalties.l1l2 import L1, L1L2, L2
from ._penalties.l2sp import L2SP, l2sp
from ._penalties.orthogonal import Orthogonal, OrthogonalRegularizer
from ._state import REGULARIZER_CLASSES
from .schedules import Schedule

__all__ = [
    "Regularizer",
    "L1",
    "L2",
    "L1L2",
    "Orthogonal",
    "OrthogonalRegularizer",
    "Custom",
    "GroupLasso",
    "L2SP",
    "accumulation_dtype",
    "check_coefficient",
    "l1",
    "l2",
    "l1_l2",
    "orthogonal",
    "l2sp",
    "group_lasso",
    "get",
    "serialize",
    "deserialize",
    "register",
]


# Where pickles of a model regularized with L2-SP find its load hook.
_l2sp_reference_load_hook = _l2sp_module.reference_load_hook

# The classes carry this module's path (regcollect.regularizers.L2), which pickles record,
# rather than the private one they are defined in.
for _cls in (Regularizer, L1, L2, L1L2, Orthogonal, Custom, GroupLasso, L2SP):
    _cls.__module__ = __name__
del _cls


@keywords_checked
def l1(l1: CoefficientArg = 0.01) -> L1:
    """``L1(l1)``: ``l1 * sum(abs(x))``.

    Args:
        l1: The coefficient (a float >= 0 or a schedule).

    Returns:
        The ``L1`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.l1(0.5)(torch.tensor([-1.0, 2.0])))
        1.5
    """
    return L1(l1)


@keywords_checked
def l2(l2: CoefficientArg = 0.01) -> L2:
    """``L2(l2)``: ``l2 * sum(x**2)``; ``SGD(weight_decay=wd)`` is ``rc.l2(wd / 2)``.

    Args:
        l2: The coefficient (a float >= 0 or a schedule).

    Returns:
        The ``L2`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.l2(0.1)(torch.tensor([1.0, 2.0])))
        0.5
    """
    return L2(l2)


@keywords_checked
def l1_l2(l1: CoefficientArg = 0.01, l2: CoefficientArg = 0.01) -> L1L2:
    """``L1L2(l1, l2)``: ``l1 * sum(abs(x)) + l2 * sum(x**2)``, with Keras's factory defaults
    of 0.01 each (the class ``L1L2`` defaults to 0.0).

    Args:
        l1: The L1 coefficient (a float >= 0 or a schedule).
        l2: The L2 coefficient (a float >= 0 or a schedule).

    Returns:
        The ``L1L2`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.l1_l2(l1=0.5, l2=0.1)(torch.tensor([-1.0, 2.0])))   # 0.5*3 + 0.1*5
        2.0
    """
    return L1L2(l1=l1, l2=l2)


@keywords_checked
def orthogonal(factor: CoefficientArg = 0.01, mode: str = "rows") -> Orthogonal:
    """``Orthogonal(factor, mode)``: Keras's ``OrthogonalRegularizer``.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        mode: ``"rows"`` or ``"columns"`` (Keras's names), or ``"outputs"``/``"inputs"``.

    Returns:
        The ``Orthogonal`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.orthogonal(0.01)(torch.eye(3)))   # orthonormal rows: no penalty
        0.0
    """
    return Orthogonal(factor=factor, mode=mode)


_STRING_ALIASES: dict[str, Callable[[], Regularizer]] = {
    "l1": L1,
    "l2": L2,
    "l1_l2": l1_l2,
    "l1l2": l1_l2,
    "orthogonal": Orthogonal,
    "orthogonal_regularizer": Orthogonal,
    "l2sp": L2SP,
    "group_lasso": GroupLasso,
}

_FACTORIES: tuple[Callable[[], Regularizer], ...] = (l1, l2, l1_l2, orthogonal, l2sp, group_lasso)


def _by_string(name: str) -> Callable[..., Regularizer] | None:
    return _STRING_ALIASES.get(name) or REGULARIZER_CLASSES.get(name)


R = TypeVar("R", bound=type[Regularizer])


def register(name: str) -> Callable[[R], R]:
    """Class decorator: make a ``Regularizer`` subclass resolvable by ``name``.

    Only registered names resolve in ``get`` and ``deserialize``; nothing is imported.

    Args:
        name: The name ``serialize`` writes as ``class_name`` and strings resolve.

    Returns:
        The decorator, which returns the class unchanged.

    Raises:
        ValueError: ``name`` is empty or not a string, or already names another class. The
            same class defined again (a notebook cell run twice, a reloaded module: the same
            module and qualified name) takes the name over, as in Keras.
        TypeError: The decorated object is not a ``Regularizer`` subclass.

    Examples:
        >>> import torch, regcollect as rc
        >>> @rc.register("DocsMaxAbs")
        ... class MaxAbs(rc.Regularizer):
        ...     def __init__(self, c=0.01):
        ...         self.c = c
        ...     def __call__(self, x):
        ...         return self.c * x.abs().max()
        ...     def get_config(self):
        ...         return {"c": self.c}
        >>> rc.regularizers.get("DocsMaxAbs")
        MaxAbs(c=0.01)
    """
    if not isinstance(name, str) or not name:
        hint = ' (decorate with @rc.register("Name"), with the name)' if callable(name) else ""
        raise ValueError(f"register expects a non-empty string name, got {name!r}{hint}")

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise TypeError(f"register({name!r}) expects a Regularizer subclass, got {cls!r}")
        existing = REGULARIZER_CLASSES.get(name)
        if existing is not None and _where(existing) != _where(cls):  # not a redefinition
            raise ValueError(
                f"a regularizer is already registered as {name!r}: {_where(existing)}; "
                f"register {_where(cls)} under another name"
            )
        REGULARIZER_CLASSES[name] = cls
        cls._registered_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


for _cls in (L1, L2, L1L2, L2SP, GroupLasso):
    register(_cls.__name__)(_cls)
# Serialised under Keras's class name, so that keras.regularizers.deserialize reads it;
# "Orthogonal" (what earlier versions wrote) still loads.
register("OrthogonalRegularizer")(Orthogonal)
REGULARIZER_CLASSES["Orthogonal"] = Orthogonal


def _needs_arguments(factory: Callable[..., Any]) -> bool:
    """Whether ``factory()`` would fail for want of an argument (``Sum`` needs a list)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    return any(
        p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in signature.parameters.values()
    )


def _accepted() -> str:
    factories: dict[str, Callable[..., Any]] = {**REGULARIZER_CLASSES, **_STRING_ALIASES}
    names = sorted(n for n, factory in factories.items() if not _needs_arguments(factory))
    return (
        "None, a Regularizer, one of the strings "
        + ", ".join(repr(n) for n in names)
        + ', a dict {"class_name": ..., "config": {...}}, or a callable f(tensor) -> scalar tensor'
    )


def serialize(regularizer: Regularizer) -> dict[str, Any]:
    """``{"class_name": registered name, "config": get_config()}``, JSON-safe.

    Args:
        regularizer: A regularizer whose class is registered (all built-in ones are).

    Returns:
        The config dict; schedules in it are serialised too.

    Raises:
        TypeError: ``regularizer`` is not a ``Regularizer``.
        ValueError: Its class is not registered (``@rc.register(name)``).

    Examples:
        >>> import regcollect as rc
        >>> rc.serialize(rc.l2(1e-4))
        {'class_name': 'L2', 'config': {'l2': 0.0001}}
    """
    if not isinstance(regularizer, Regularizer):
        raise TypeError(f"serialize expects a Regularizer, got {type(regularizer).__name__}")
    cls = type(regularizer)
    name = vars(cls).get("_registered_name")  # its own, not a registered base class's
    registered = REGULARIZER_CLASSES.get(name) if name is not None else None
    # An instance made before its class was defined again (a cell run twice) still counts.
    if registered is None or _where(registered) != _where(cls):
        raise ValueError(
            f"{type(regularizer).__name__} is not registered; decorate it with "
            "@regcollect.register(name) to serialise it"
        )
    config = {
        key: serialize_schedule(value) if isinstance(value, Schedule) else value
        for key, value in regularizer.get_config().items()
    }
    return {"class_name": name, "config": config}


def deserialize(config: dict[str, Any]) -> Regularizer:
    """Inverse of ``serialize``. Only registered class names resolve; nothing is imported.

    Args:
        config: ``{"class_name": str, "config": dict}`` (Keras's ``module`` and
            ``registered_name`` keys are accepted and ignored).

    Returns:
        The regularizer.

    Raises:
        TypeError: ``config`` is not a dict.
        ValueError: Missing or unknown keys, an unregistered class name, or a config the
            class does not accept.

    Examples:
        >>> import regcollect as rc
        >>> rc.deserialize({"class_name": "L1L2", "config": {"l1": 0.0, "l2": 0.5}})
        L1L2(l1=0.0, l2=0.5)
    """
    if not isinstance(config, dict):
        hint = (
            f"; for a name, rc.regularizers.get({shown(config)})" if isinstance(config, str) else ""
        )
        raise TypeError(
            f"deserialize expects a dict, got {type(config).__name__} {shown(config)}{hint}"
        )
    unknown = set(config) - {"class_name", "config", "module", "registered_name"}
    if "class_name" not in config or unknown:
        raise ValueError(
            'deserialize expects {"class_name": str, "config": dict}, got keys '
            f"{shown(sorted(map(str, config)))}"
        )
    name = config["class_name"]
    cls = REGULARIZER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown regularizer class_name {shown(name)}; registered: "
            f"{sorted(REGULARIZER_CLASSES)}"
        )
    inner = config.get("config", {})
    if not isinstance(inner, dict) or not all(isinstance(k, str) for k in inner):
        raise ValueError(
            f"the config of {name!r} must be a dict with string keys, got {shown(inner)}"
        )
    try:
        return cls.from_config(inner)
    except TypeError as exc:
        raise ValueError(f"bad config for regularizer {name!r}: {shown(inner)} ({exc})") from None
    except RecursionError:
        raise ValueError(
            f"the config of regularizer {name!r} is nested too deeply to be a real plan"
        ) from None


def get(identifier: object) -> Regularizer | None:
    """Resolve anything a layer argument accepts into a ``Regularizer`` (or None).

    Args:
        identifier: None, a ``Regularizer``, a registered name or alias (``"l2"``,
            ``"l1_l2"``), a factory or class passed uncalled (``rc.l2``), a config dict, a
            Keras regularizer object (``keras.regularizers.L2(0.01)`` is ``rc.L2(0.01)``), or
            a callable ``f(tensor) -> scalar tensor`` (wrapped in ``Custom``).

    Returns:
        The regularizer, or None for None.

    Raises:
        ValueError: An unknown name, a name whose class needs arguments, or an object that
            is none of the above; the message lists what is accepted.

    Examples:
        >>> get("l2")
        L2(l2=0.01)
        >>> get({"class_name": "L1", "config": {"l1": 0.5}})
        L1(l1=0.5)
    """
    if identifier is None:
        return None
    if isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, str):
        factory = _by_string(identifier)
        if factory is None:
            raise ValueError(f"unknown regularizer {shown(identifier)}; expected {_accepted()}")
        if _needs_arguments(factory):
            raise ValueError(
                f"regularizer {identifier!r} needs arguments and cannot be named by a string; "
                f"build it ({identifier}(...)) and pass the object"
            )
        return factory()
    if identifier in _FACTORIES:  # rc.l2 passed uncalled, like the class rc.L2
        return identifier()  # type: ignore[operator, no-any-return]
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, type):
        if issubclass(identifier, Regularizer):
            return identifier()
        raise ValueError(
            f"cannot use the class {identifier!r} as a regularizer; expected {_accepted()}"
        )
    if callable(identifier) and not isinstance(identifier, torch.nn.Module):
        keras = keras_config(identifier)
        return deserialize(keras) if keras is not None else Custom(identifier)
    raise ValueError(
        f"cannot interpret {shown(identifier)} (type {type(identifier).__name__}) as a "
        "regularizer; "
        f"expected {_accepted()}"
    )


def __dir__() -> list[str]:
    """The public API (``__all__``): what tab completion offers, not this module's imports."""
    return sorted(__all__)
