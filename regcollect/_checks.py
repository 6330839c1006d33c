"""Argument checks shared by every layer of the package, and the package's warning class.

Every error says which argument was wrong, what was expected and what was received.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import reprlib
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import ParamSpec, TypeVar

import torch

__all__ = [
    "CoefficientTypeError",
    "RegcollectWarning",
    "ScopeArg",
    "keywords_checked",
    "check_module",
    "check_scope",
    "shown",
    "suggest_keyword",
    "warn_user",
]

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 80
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 3, 8, 8, 8, 8


def shown(value: object) -> str:
    """``repr(value)`` for an error message, bounded: what a user or an untrusted file gave is
    never echoed whole (a long string shows its start and its length).

    Examples:
        >>> shown("x" * 1000)
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1000 characters)"
        >>> shown({"l2": 0.1})
        "{'l2': 0.1}"
    """
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return _SHORT.repr(value)


class RegcollectWarning(UserWarning):
    """Something regcollect cannot fix for you, such as penalties that are never consumed.

    Examples:
        >>> import warnings, regcollect as rc
        >>> with warnings.catch_warnings():   # e.g. in a test suite: make them errors
        ...     warnings.simplefilter("error", rc.RegcollectWarning)
    """


class CoefficientTypeError(TypeError, ValueError):
    """A coefficient of the wrong type: a ``TypeError``, and a ``ValueError`` as the API's
    contract has always raised for any bad coefficient."""


P = ParamSpec("P")
R = TypeVar("R")


def keywords_checked(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, whose misspelled keyword arguments get a suggestion: ``regularize(model,
    kernal=...)`` raises ``TypeError: ... unexpected keyword argument 'kernal'; did you mean
    'kernel'?``. Costs nothing on a call that binds: the check runs only on a ``TypeError``
    raised by the call itself (not from inside ``fn``).

    Examples:
        >>> @keywords_checked
        ... def l2(l2=0.01):
        ...     return l2
        >>> l2(l_2=0.1)
        Traceback (most recent call last):
        TypeError: l2() got an unexpected keyword argument 'l_2'; did you mean 'l2'?
    """

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except TypeError as exc:
            suggest_keyword(exc, fn.__qualname__.replace(".__init__", ""), kwargs, _keywords(fn))
            raise

    return checked


def _keywords(fn: Callable[..., object]) -> list[str] | None:
    """The keywords ``fn`` takes; None if it takes any (``**kwargs``) or has no signature."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named and p.name != "self"]


def suggest_keyword(
    exc: TypeError,
    name: str,
    kwargs: dict[str, object],
    accepted: list[str] | None,
    covers: dict[str, str] | None = None,
) -> None:
    """When ``exc`` was raised binding a call to ``name`` (not from inside it), raise a
    ``TypeError`` that suggests the keyword meant for the first of ``kwargs`` that ``name``
    does not take (of ``accepted``); else return, for the caller to re-raise ``exc``.
    ``covers`` (a layer's ``{argument: pattern of the parameter names it covers}``) turns a
    parameter's own name (``weight_regularizer``; an RNN's ``weight_hh_regularizer``, for
    ``weight_hh_l0``) into the argument that covers it."""
    if exc.__traceback__ is None or accepted is None:
        return
    unknown = next((k for k in kwargs if k not in accepted), None)
    if unknown is None:
        return
    param = unknown.removesuffix("_regularizer")
    named = (param, f"{param}_l0")
    close = [a for a, p in (covers or {}).items() if any(re.fullmatch(p, n) for n in named)][:1]
    if exc.__traceback__.tb_next is not None:  # raised inside the function: is it the binding
        passed_on = f"unexpected keyword argument {unknown!r}" in str(exc)  # of a base class?
        if not (close and passed_on):
            return
    close = close or [k for k in _in_keras_words(unknown) if k in accepted][:1]
    close = close or difflib.get_close_matches(unknown, accepted, n=1, cutoff=0.5)
    if not close:  # a prefix (bias_regularizer for bias) is a near miss too
        close = [a for a in accepted if unknown.startswith(a) or a.startswith(unknown)][:1]
    start = f"{name}() got an unexpected keyword argument {unknown!r}"
    hint = f"did you mean {close[0]!r}?" if close else f"{name}() takes: {', '.join(accepted)}"
    raise TypeError(f"{start}; {hint}") from None


# PyTorch's and Keras 1's words for what Keras 2 (and regcollect) call a kernel and a bias:
# ``weight_regularizer`` and ``W_regularizer`` mean ``kernel_regularizer``.
_KERAS_WORDS = {"weight": "kernel", "weights": "kernel", "w": "kernel", "b": "bias"}


def _in_keras_words(keyword: str) -> list[str]:
    head, sep, tail = keyword.partition("_")
    word = _KERAS_WORDS.get(head.lower())
    return [] if word is None else [word + sep + tail]


# Frames of these packages lie between a user's call and a warning: regcollect's own, and
# torch's hook machinery (an optimizer step hook runs inside ``Optimizer.step``'s wrapper).
_INTERNAL = ("regcollect", "torch")


def warn_user(message: str, category: type[Warning] = RegcollectWarning) -> None:
    """``warnings.warn`` at the user's line: the first frame on the stack outside regcollect
    and torch, however deep the call that warns (a fixed ``stacklevel`` would name a line
    inside regcollect as soon as the warning moves, or is reached by another path).

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_user("careful")
        >>> seen[0].filename.endswith(".py") or seen[0].filename.startswith("<doctest")
        True
    """
    # sys._getframe(1), warn_user's caller, is what stacklevel=2 names.
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# What loss(), losses(), penalties() and summary() take as ``scope``.
ScopeArg = str | torch.nn.Module | Sequence[torch.nn.Module] | None


def check_module(module: object, argument: str = "module") -> torch.nn.Module:
    """``module`` if it is an ``nn.Module``, else a ``TypeError`` naming ``argument``."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {type(module).__name__}")
    return module


def check_scope(scope: object) -> str | tuple[torch.nn.Module, ...] | None:
    """A scope as a regular expression string, a tuple of modules, or None.

    Accepts a string, an ``nn.Module`` or a non-empty list/tuple of ``nn.Module`` objects.
    """
    if scope is None or isinstance(scope, str):
        return scope
    if isinstance(scope, torch.nn.Module):
        return (scope,)
    if isinstance(scope, (list, tuple)):
        if not scope:
            raise ValueError("scope must not be an empty list: pass None for every entry")
        bad = [s for s in scope if not isinstance(s, torch.nn.Module)]
        if not bad:
            return tuple(scope)
        raise TypeError(
            "scope must be a regular expression string, an nn.Module or a list of nn.Modules, "
            f"got a {type(scope).__name__} containing {type(bad[0]).__name__} {bad[0]!r}"
        )
    raise TypeError(
        "scope must be a regular expression string, an nn.Module or a list of nn.Modules, "
        f"got {type(scope).__name__} {scope!r}"
    )


# The public path (regcollect.RegcollectWarning), which pickles and reprs record.
RegcollectWarning.__module__ = "regcollect"
