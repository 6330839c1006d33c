"""Penalties no peer offers: L2-SP for fine-tuning and group lasso for structured sparsity.

- ``L2SP`` (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with
  convolutional networks", ICML 2018): ``l2 * sum((x - x0)**2)``, the distance to the
  pretrained weights ``x0`` rather than to zero, which plain L2 would pull what pretraining
  learned towards.
- ``GroupLasso`` (Yuan and Lin, "Model selection and estimation in regression with grouped
  variables", JRSS B 2006; for pruning, Wen et al., "Learning structured sparsity in deep
  neural networks", NeurIPS 2016): ``factor * sum_g ||x_g||_2`` over slices of ``x``, which
  drives whole rows or filters to zero so that they can be removed.

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

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ._kernels import difference_penalty
from ._penalties import (
    Coefficient,
    Regularizer,
    accumulation_dtype,
    check_tensor,
    coefficient,
    scale,
    zero_like,
)
from ._sharding import is_plain

__all__ = [
    "REFERENCE_SUFFIX",
    "check_reference_shape",
    "GroupLasso",
    "L2SP",
    "group_lasso",
    "l2sp",
    "reference_name",
    "reference_of",
]

REFERENCE_SUFFIX = "_l2sp_reference"
# Group lasso stacks tensors of one shape up to this size (one node for many small kernels).
_STACK_MAX_BYTES = 64 * 1024


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
    full = getattr(x, "full_tensor", None)  # a DTensor: the whole tensor
    return full() if callable(full) else x


def _load_reference(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Load pre-hook: a checkpoint without a parameter's reference (a plain pretrained one)
    makes the loaded weights the reference; one with it (a saved fine-tuning run) restores
    the original."""
    explicit = _EXPLICIT.get(module, ())
    for buffer in list(module._buffers):
        if buffer.endswith(REFERENCE_SUFFIX):
            param = buffer[: -len(REFERENCE_SUFFIX)]
            if param in explicit:
                continue  # a reference the user gave wins over any load that lacks it
            if prefix + buffer not in state_dict and prefix + param in state_dict:
                # A copy: load_state_dict(..., assign=True) (meta-device initialisation)
                # would otherwise make the reference the weight tensor itself.
                state_dict[prefix + buffer] = state_dict[prefix + param].detach().clone()


# Parameters whose L2SP reference was given explicitly (reference=...), per module: a load
# without the buffer keeps it instead of taking the loaded weights.
_EXPLICIT: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _install_load_hook(module: torch.nn.Module) -> None:
    for hook in module._load_state_dict_pre_hooks.values():
        if getattr(hook, "hook", None) is _load_reference:
            return
    module.register_load_state_dict_pre_hook(_load_reference)


class L2SP(Regularizer):
    """``l2 * sum((x - x0)**2)``: L2 towards a reference ``x0`` (L2-SP, Li et al. 2018).

    ``x0`` is ``reference`` when given (a tensor of ``x``'s shape; through
    ``regcollect.regularize``, a state dict mapping parameter names to tensors), else the
    parameter's value when the regularizer is registered on it. The reference is kept on the
    module as the persistent buffer ``<parameter>_l2sp_reference`` (see the module
    docstring); registering again keeps it unless a new ``reference`` is given, and
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

    applied_in_step = True

    def __init__(
        self,
        l2: Coefficient = 0.01,
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

    # -- on a module ----------------------------------------------------------------------

    def on_attach(self, module: torch.nn.Module, name: str) -> None:
        """Store the reference as the buffer ``<name>_l2sp_reference`` of ``module``.

        Args:
            module: The module that owns the parameter.
            name: The parameter's name in ``module``.

        Raises:
            ValueError: ``reference`` is a state dict (only ``rc.regularize`` resolves those)
                or a tensor of another shape than the parameter.
        """
        param = module._parameters[name]
        assert param is not None
        buffer = reference_name(name)
        given = self.reference
        if isinstance(given, Mapping):
            raise ValueError(
                "an L2SP reference given as a state dict is resolved by name in "
                "regcollect.regularize; for one parameter pass its tensor"
            )
        with torch.no_grad():
            if given is not None:
                check_reference_shape(given, param, name)
                value = given.detach().to(device=param.device, dtype=param.dtype).clone()
                _EXPLICIT.setdefault(module, set()).add(name)
            elif module._buffers.get(buffer) is not None:
                value = None  # registered again: keep the original reference
            else:
                value = param.detach().clone()
        if value is not None:
            module.register_buffer(buffer, value, persistent=True)
        _install_load_hook(module)

    def on_detach(self, module: torch.nn.Module, name: str) -> None:
        module._buffers.pop(reference_name(name), None)
        _EXPLICIT.get(module, set()).discard(name)

    def for_parameter(self, module: torch.nn.Module, name: str | None) -> Regularizer:
        if name is None:
            return self
        return L2SP(self.l2, reference=reference_of(module, name))

    def batch_key(self, x: torch.Tensor) -> Any:
        reference = self.reference
        if (
            isinstance(reference, torch.Tensor)
            and is_plain(reference)  # a sharded reference is called alone
            and reference.shape == x.shape
            and reference.dtype == x.dtype
            and reference.device == x.device
        ):
            return self.l2
        return None

    @classmethod
    def batch(
        cls, xs: list[torch.Tensor], regularizers: list[Regularizer]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        coef = regularizers[0].l2  # type: ignore[attr-defined]
        references = [r.reference for r in regularizers]  # type: ignore[attr-defined]
        return difference_penalty(scale(coef, xs[0]), xs, references)


class GroupLasso(Regularizer):
    """``factor * sum_g ||x_g||_2``: the L2 norms of the slices ``x_g`` of ``x`` along
    ``axis``, summed.

    With ``axis=0`` (the default) the groups are the rows of a ``Linear`` weight (one per
    output unit) or the filters of a convolution kernel (``(out, in, *k)``): the penalty
    drives whole units to exactly zero, and in ``attach_optimizer(..., decoupled=True)``
    its proximal step (block soft-thresholding) sets them to zero exactly. ``axis=1``
    groups input units or channels. On a vector each element is a group: L1.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        axis: The dimension whose slices are the groups.

    Raises:
        ValueError: ``axis`` is not an int; a negative, NaN or infinite ``factor``; when
            called, an ``axis`` out of the tensor's range.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> float(GroupLasso(0.1)(x))  # 0.1 * (5 + 0)
        0.5
    """

    applied_in_step = True

    def __init__(self, factor: Coefficient = 0.01, axis: int = 0) -> None:
        self.factor = coefficient("factor", factor)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int, got {axis!r} of type {type(axis).__name__}")
        self.axis = axis

    def _axis(self, x: torch.Tensor) -> int:
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"GroupLasso axis={self.axis} is out of range for a tensor of shape "
                f"{tuple(x.shape)} (expected {-max(x.dim(), 1)} <= axis < {max(x.dim(), 1)})"
            )
        return self.axis % x.dim()

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each group (slice along ``axis``), in float32 at least.

        Args:
            x: The tensor.

        Returns:
            A 1-D tensor with one norm per group.

        Raises:
            ValueError: ``axis`` is out of ``x``'s range.
        """
        axis = self._axis(x)
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return torch.linalg.vector_norm(rows, 2, dim=1, dtype=accumulation_dtype(x.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "GroupLasso")
        self._axis(x)
        if x.numel() == 0:
            return zero_like(x) + 0.0 * x.sum()
        return scale(self.factor, x) * self.norms(x).sum()

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "axis": self.axis}

    def batch_key(self, x: torch.Tensor) -> Any:
        if x.numel() == 0 or not -x.dim() <= self.axis < x.dim():
            return None  # called alone: the empty case, or the error naming the entry
        return (self.factor, self.axis % x.dim(), x.shape)

    @classmethod
    def batch(
        cls, xs: list[torch.Tensor], regularizers: list[Regularizer]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = regularizers[0]
        assert isinstance(first, GroupLasso)
        axis = first.axis % xs[0].dim()
        acc = accumulation_dtype(xs[0].dtype)
        if xs[0].numel() * xs[0].element_size() > _STACK_MAX_BYTES:
            # Large tensors: one norm each; a stacked copy would cost more than it saves.
            sums = torch.stack([first.norms(x).sum() for x in xs])
        else:
            stacked = torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0)
            rows = stacked.movedim(axis + 1, 1).reshape(len(xs), xs[0].shape[axis], -1)
            sums = torch.linalg.vector_norm(rows, 2, dim=2, dtype=acc).sum(dim=1)
        values = scale(first.factor, xs[0]) * sums
        return values.sum(), values.detach()


def l2sp(
    l2: Coefficient = 0.01, reference: torch.Tensor | Mapping[str, torch.Tensor] | None = None
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


def group_lasso(factor: Coefficient = 0.01, axis: int = 0) -> GroupLasso:
    """``GroupLasso(factor, axis)``: ``factor * sum_g ||x_g||_2``.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        axis: The dimension whose slices are the groups (0: rows, filters).

    Returns:
        The ``GroupLasso`` regularizer.

    Examples:
        >>> import torch, regcollect as rc
        >>> float(rc.group_lasso(0.1)(torch.tensor([[3.0, 4.0], [0.0, 0.0]])))
        0.5
    """
    return GroupLasso(factor, axis)
