"""``L2SP`` (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with
convolutional networks", ICML 2018): ``l2 * sum((x - x0)**2)``, the distance to the pretrained
weights ``x0`` rather than to zero, which plain L2 would pull what pretraining learned towards.

Everything L2-SP needs is here: its value, its batched evaluation (the grouped squared
distances of ``regcollect._kernels.difference_penalty``), its step math
(``L2SP_TERM``: coupled ``grad += 2 c (w - w0)``, decoupled ``w += lr * 2 c (w0 - w)`` before
the update) and its state on the module.

Registered on a module, an ``L2SP`` keeps its reference on that module as a persistent
buffer ``<parameter>_l2sp_reference``: it moves with ``model.to()``, and it is in the model's
``state_dict``, so a checkpoint keeps the original reference and resuming restores it instead
of taking the resumed weights. Loading a checkpoint that has no reference (a plain pretrained
one) makes a copy of the loaded weights the reference (``assign=True`` included), unless the
reference was given explicitly (``reference=``): that one wins over any load that lacks it.
The buffer goes only when its registration is removed (``handle.remove()``); replaced by
another penalty (an override in ``with``) or after ``Collection.clear()``, it stays, so the
original reference comes back with the registration.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .._checks import keywords_checked
from .._distributed.seam import is_plain, placement_of
from .base import (
    Coefficient,
    Regularizer,
    Term,
    accumulation_dtype,
    check_tensor,
    coefficient,
    scale,
)
from .coefficients import CoefficientArg
from .kernel import Kernel, register_kernel
from .kernels import difference_penalty
from .step import Scalar, add_coupled_, by_device_and_dtype, chunks, scaled

__all__ = [
    "L2SP",
    "L2SP_TERM",
    "REFERENCE_SUFFIX",
    "check_reference_shape",
    "l2sp",
    "reference_name",
    "reference_of",
]

REFERENCE_SUFFIX = "_l2sp_reference"
# The names of a module's parameters whose reference was given explicitly (reference=...),
# kept on the module itself (it travels with deepcopy and pickling, as the buffers do): a load
# without the buffer keeps such a reference instead of taking the loaded weights.
_EXPLICIT = "_l2sp_explicit_references"


def reference_name(param: str) -> str:
    """The buffer holding the L2-SP reference of parameter ``param`` in its module."""
    return param + REFERENCE_SUFFIX


def reference_of(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The L2-SP reference of ``module``'s parameter ``name``, in the parameter's dtype and
    on its device."""
    reference = module._buffers.get(reference_name(name))
    if reference is None:
        raise ValueError(
            f"L2SP on {type(module).__name__}.{name}: its reference buffer "
            f"{reference_name(name)!r} is gone; register the regularizer again"
        )
    param = module._parameters.get(name)
    if param is not None and (reference.dtype, reference.device) != (param.dtype, param.device):
        reference = reference.to(device=param.device, dtype=param.dtype)
    return reference


def check_reference_shape(reference: torch.Tensor, param: torch.Tensor, name: str) -> None:
    """An L2-SP reference for parameter ``name`` must have the parameter's shape.

    Raises:
        ValueError: It has another shape.
    """
    if tuple(reference.shape) != tuple(param.shape):
        raise ValueError(
            f"L2SP reference for {name!r} has shape {tuple(reference.shape)}, "
            f"expected the parameter's shape {tuple(param.shape)}"
        )


def _full(x: torch.Tensor) -> torch.Tensor:
    """The whole of a reference (a DTensor's gathered); one no rank has whole as it is."""
    whole = placement_of(x).whole
    return x if whole is None else whole(x)


def reference_load_hook(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Load pre-hook: a checkpoint without a parameter's reference (a plain pretrained one)
    makes the loaded weights the reference; one with it (a saved fine-tuning run) restores
    the original."""
    explicit = module.__dict__.get(_EXPLICIT, ())
    for buffer in list(module._buffers):
        if buffer.endswith(REFERENCE_SUFFIX):
            param = buffer[: -len(REFERENCE_SUFFIX)]
            if param in explicit:
                continue  # a reference the user gave wins over any load that lacks it
            if prefix + buffer not in state_dict and prefix + param in state_dict:
                # A copy: load_state_dict(..., assign=True) (meta-device initialisation)
                # would otherwise make the reference the weight tensor itself.
                state_dict[prefix + buffer] = state_dict[prefix + param].detach().clone()


# A model pickled whole records its load hooks: by their public home (regcollect.regularizers
# binds this one), not this module.
reference_load_hook.__module__ = "regcollect.regularizers"
reference_load_hook.__qualname__ = "_l2sp_reference_load_hook"


def _install_load_hook(module: torch.nn.Module) -> None:
    for hook in module._load_state_dict_pre_hooks.values():
        if getattr(hook, "hook", None) is reference_load_hook:
            return
    module.register_load_state_dict_pre_hook(reference_load_hook)


class L2SP(Regularizer):
    """``l2 * sum((x - x0)**2)``: L2 towards a reference ``x0`` (L2-SP, Li et al. 2018).

    ``x0`` is ``reference`` when given (a tensor of ``x``'s shape; through
    ``regcollect.regularize``, a state dict: a parameter's ``<name>_l2sp_reference`` entry,
    which a fine-tuning checkpoint holds, else its ``<name>`` entry, which a pretrained one
    holds), else the parameter's value when the regularizer is registered on it, unless its
    module already holds a reference buffer (a restored fine-tuning model): that one wins.
    The reference is kept on the module as the persistent buffer
    ``<parameter>_l2sp_reference`` (see the module docstring); registering again keeps it
    unless a new ``reference`` is given, and
    removing the registration (``handle.remove()``) deletes it, leaving the model's
    ``state_dict`` as it was.

    Called on a tensor directly, it needs ``reference``.

    Args:
        l2: The coefficient (a float >= 0 or a schedule).
        reference: The reference tensor, a state dict (through ``rc.regularize``) or None.

    Raises:
        TypeError: ``reference`` is not a floating-point tensor, a mapping or None.
        ValueError: A negative, NaN or infinite coefficient; when called on a tensor, no
            reference tensor or one of another shape.

    Examples:
        >>> import torch
        >>> x0 = torch.tensor([1.0, 2.0])
        >>> float(L2SP(0.5, reference=x0)(torch.tensor([2.0, 0.0])))  # 0.5 * (1 + 4)
        2.5
    """

    @keywords_checked
    def __init__(
        self,
        l2: CoefficientArg = 0.01,
        reference: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.l2 = coefficient("l2", l2)
        if reference is not None and not isinstance(reference, (torch.Tensor, Mapping)):
            raise TypeError(
                "reference must be a tensor, a state dict (through regularize) or None, "
                f"got {type(reference).__name__}"
            )
        if isinstance(reference, torch.Tensor) and not reference.is_floating_point():
            raise TypeError(f"reference must be a floating-point tensor, got {reference.dtype}")
        self.reference = reference

    def _reference_for(self, x: torch.Tensor) -> torch.Tensor:
        reference = self.reference
        if not isinstance(reference, torch.Tensor):
            raise ValueError(
                "L2SP called on a tensor needs reference=<tensor>; registered on a parameter "
                "(a layer argument, add_regularizer, regularize) it takes the parameter's "
                f"value at registration. Got reference={type(reference).__name__}"
            )
        if tuple(reference.shape) != tuple(x.shape):
            raise ValueError(
                f"L2SP reference has shape {tuple(reference.shape)}, but the tensor it "
                f"regularizes has shape {tuple(x.shape)}"
            )
        return reference

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "L2SP")
        reference = _full(self._reference_for(x))
        acc = accumulation_dtype(x.dtype)
        diff = x.to(acc) - reference.detach().to(device=x.device, dtype=acc)
        return scale(self.l2, x) * (diff * diff).sum()

    def get_config(self) -> dict[str, Any]:
        # The reference is data, not configuration: it travels in the model's state_dict.
        return {"l2": self.l2}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        """Rebuild from ``get_config()``, which holds no reference.

        Args:
            config: The constructor's keyword arguments but ``reference``.

        Returns:
            ``cls(**config)``.

        Raises:
            ValueError: ``config`` has a ``reference``.
        """
        if "reference" in config:
            raise ValueError(
                "an L2SP reference is not configuration: it is saved in the model's "
                f"state_dict (buffer <parameter>{REFERENCE_SUFFIX}); got reference="
                f"{type(config['reference']).__name__}"
            )
        return cls(**config)


class _L2SPTerm(Term):
    """``coef * sum((w - w0)**2)``, ``w0`` the reference buffer on the parameter's module."""

    def shardable(self, cut: frozenset[int], ndim: int) -> bool:
        # The reference is a buffer of its own placement (plain and whole, or not): the step
        # takes it to plain parameters only.
        return False

    def locate(self, module: torch.nn.Module | None, name: str | None) -> Any:
        # Looked up at each step: model.to() replaces the buffer.
        return (weakref.ref(module) if module is not None else None, name)

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
        for _, (ps, gs, rs) in by_device_and_dtype(params, grads, _references(where)):
            for part, grad, refs in chunks(ps, gs, rs):
                add_coupled_(
                    grad, list(torch._foreach_sub(part, refs)), sign * 2.0 * coef, grad_scale
                )

    def before_(
        self,
        coef: float,
        lr: Scalar,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """``w += lr * 2 * coef * (w0 - w)``: towards the reference, as AdamW decays towards
        zero."""
        for device, (ps, rs) in by_device_and_dtype(params, _references(where)):
            weight = scaled(lr * 2.0 * coef, keep, device)
            if isinstance(weight, torch.Tensor):
                for p, r in zip(ps, rs):
                    p.lerp_(r, weight.to(p.dtype))
            else:
                torch._foreach_lerp_(ps, rs, weight)


def _references(where: list[Any]) -> list[torch.Tensor]:
    """The current references of the parameters at ``where`` (their modules' buffers)."""
    out = []
    for module_ref, name in where:
        module = module_ref() if module_ref is not None else None
        if module is None:
            raise RuntimeError(f"the module holding {name!r} is gone")
        out.append(reference_of(module, name))
    return out


L2SP_TERM = _L2SPTerm()


class _L2SPKernel(Kernel):
    """L2-SP's reference buffer on the module, its binding to it, its batched value."""

    def terms(self, reg: Any) -> tuple[tuple[Term, Coefficient], ...]:
        return ((L2SP_TERM, reg.l2),)

    def attach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        """Store the reference as the buffer ``<name>_l2sp_reference`` of ``module``.

        Raises:
            ValueError: ``reference`` is a state dict (only ``rc.regularize`` resolves those)
                or a tensor of another shape than the parameter.
        """
        param = module._parameters[name]
        assert param is not None
        buffer = reference_name(name)
        given = reg.reference
        if isinstance(given, Mapping):
            raise ValueError(
                "an L2SP reference given as a state dict is resolved by name in "
                "regcollect.regularize; for one parameter pass its tensor"
            )
        with torch.no_grad():
            if given is not None:
                check_reference_shape(given, param, name)
                value = given.detach().to(device=param.device, dtype=param.dtype).clone()
                module.__dict__.setdefault(_EXPLICIT, set()).add(name)
            elif module._buffers.get(buffer) is not None:
                value = None  # registered again, or restored with it: keep it
            else:
                value = param.detach().clone()
        if value is not None:
            module.register_buffer(buffer, value, persistent=True)
        _install_load_hook(module)

    def detach(self, reg: Any, module: torch.nn.Module, name: str) -> None:
        module._buffers.pop(reference_name(name), None)
        module.__dict__.get(_EXPLICIT, set()).discard(name)

    def bind(self, reg: Any, module: torch.nn.Module | None, name: str | None) -> Regularizer:
        if module is None or name is None:
            return reg  # type: ignore[no-any-return]
        bound = copy.copy(reg)  # a subclass stays itself
        bound.reference = reference_of(module, name)
        return bound  # type: ignore[no-any-return]

    def batch_key(self, reg: Any, x: torch.Tensor) -> Any:
        reference = reg.reference
        if (
            isinstance(reference, torch.Tensor)
            and is_plain(reference)  # a sharded reference is called alone
            and reference.shape == x.shape
            and reference.dtype == x.dtype
            and reference.device == x.device
        ):
            return reg.l2
        return None

    def batch(self, xs: list[torch.Tensor], regs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return difference_penalty(scale(regs[0].l2, xs[0]), xs, [r.reference for r in regs])


register_kernel(L2SP, _L2SPKernel())


@keywords_checked
def l2sp(
    l2: CoefficientArg = 0.01, reference: torch.Tensor | Mapping[str, torch.Tensor] | None = None
) -> L2SP:
    """``L2SP(l2, reference)``: ``l2 * sum((x - x0)**2)``.

    Args:
        l2: The coefficient (a float >= 0 or a schedule).
        reference: The reference ``x0``; None takes the parameter's value at registration.

    Returns:
        The ``L2SP`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> layer = torch.nn.Linear(2, 2)
        >>> handle = rc.add_regularizer(layer, "weight", rc.l2sp(0.1))   # x0: weights now
        >>> float(rc.loss(layer).detach())   # the weights have not moved yet
        0.0
        >>> handle.remove()
    """
    return L2SP(l2, reference)
