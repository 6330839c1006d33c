"""The private protocol between a penalty and the machinery: its kernel.

A ``Regularizer`` is Keras-small (``__call__``, ``get_config``, ``from_config``). What the
engine, the registry and an attached optimizer's step need beyond its value is its
``Kernel``, registered beside the penalty class (``register_kernel``), in the penalty's own
module:

- ``terms(reg)``: the penalty as ``(Term, coefficient)`` parts, or ``()`` when it is a formula
  only (called on each tensor). A part whose ``Term.p`` is 1 or 2 is ``coef * sum(|x|**p)``,
  computed by the grouped kernels; the attached step applies every part.
- ``batch_key(reg, x)`` / ``batch(xs, regs)``: many tensors at once, for penalties whose value
  is no p-norm power (L2-SP, group lasso).
- ``bind(reg, module, name)``: the regularizer ``loss()`` evaluates on that parameter (L2-SP
  bound to its reference, an orthogonal penalty to Keras's kernel layout).
- ``check(reg, x)``: whether the penalty applies to ``x`` at all (a group lasso's axis, an
  orthogonal penalty's rank), asked at registration, so that the error names the entry.
- ``attach(reg, module, name)`` / ``detach(...)``: its state on the module (L2-SP's reference).
- ``schedules(reg)``: the schedules among its coefficients.

A class with no kernel of its own takes its nearest base class's; a subclass that defines its
own ``__call__`` is its own formula (called), whatever parts or batched evaluation it would
inherit, but keeps its base's ``check``, ``bind`` and state. A user's ``Regularizer`` subclass
is a formula. Adding a penalty is one module: the class and its kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedules import Schedule
from .base import Coefficient, Regularizer, Term

__all__ = ["FORMULA", "Kernel", "kernel_of", "register_kernel"]


class Kernel:
    """The machinery's view of one penalty class; the defaults are a formula's."""

    def terms(self, reg: Any) -> tuple[tuple[Term, Coefficient], ...]:
        """The penalty as ``(Term, coefficient)`` parts; ``()``: a formula only."""
        return ()

    def check(self, reg: Any, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if the penalty cannot apply to ``x``."""

    def bind(self, reg: Any, module: torch.nn.Module | None, name: str | None) -> Regularizer:
        """What ``loss()`` evaluates on ``module``'s parameter ``name`` (None: an output or a
        bare tensor)."""
        return reg  # type: ignore[no-any-return]

    def batch_key(self, reg: Any, x: torch.Tensor) -> Any:
        """A hashable key shared by tensors ``batch`` may evaluate together, or None."""
        return None

    def batch(self, xs: list[torch.Tensor], regs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, per-tensor values)`` of tensors sharing a ``batch_key``."""
        raise NotImplementedError(f"{type(self).__name__} has no batched evaluation")

    def attach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        """Registered on ``module``'s parameter ``name``: keep state there."""

    def detach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        """No longer registered on ``module``'s parameter ``name``: drop that state."""

    def schedules(self, reg: Any) -> list[Schedule]:
        """The ``Schedule`` objects among the regularizer's attributes."""
        return [v for v in vars(reg).values() if isinstance(v, Schedule)]


FORMULA = Kernel()


class _Formula(Kernel):
    """A subclass's own ``__call__`` over a kernel's class: called, with its base's checks,
    binding and state."""

    def __init__(self, base: Kernel) -> None:
        self.base = base

    def check(self, reg: Any, x: torch.Tensor) -> None:
        self.base.check(reg, x)

    def bind(self, reg: Any, module: torch.nn.Module | None, name: str | None) -> Regularizer:
        return self.base.bind(reg, module, name)

    def attach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        self.base.attach(reg, module, name)

    def detach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        self.base.detach(reg, module, name)

    def schedules(self, reg: Any) -> list[Schedule]:
        return self.base.schedules(reg)


_KERNELS: dict[type, Kernel] = {}
_RESOLVED: dict[type, Kernel] = {}


def register_kernel(cls: type, kernel: Kernel) -> None:
    """Make ``kernel`` the machinery's view of ``cls`` (and of its subclasses).

    Args:
        cls: A ``Regularizer`` class.
        kernel: Its kernel.
    """
    _KERNELS[cls] = kernel
    _RESOLVED.clear()


def kernel_of(reg: object) -> Kernel:
    """The kernel of ``reg``'s class (see the module docstring)."""
    cls = type(reg)
    found = _RESOLVED.get(cls)
    if found is None:
        found = FORMULA
        own_call = False
        for klass in cls.__mro__:
            kernel = _KERNELS.get(klass)
            if kernel is not None:
                found = _Formula(kernel) if own_call else kernel
                break
            own_call = own_call or "__call__" in klass.__dict__
        _RESOLVED[cls] = found
    return found
