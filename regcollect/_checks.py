"""Argument checks shared by every layer of the package, and the package's warning class.

Every error says which argument was wrong, what was expected and what was received.
"""

from __future__ import annotations

import os
import reprlib
import sys
from collections.abc import Sequence

import torch

__all__ = ["RegcollectWarning", "ScopeArg", "check_module", "check_scope", "shown"]

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


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def outside() -> int:
    """The ``stacklevel`` of the first frame outside regcollect, for a warning issued here:
    it points at the user's line however deep in the package the warning is decided."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
