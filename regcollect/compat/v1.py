"""TensorFlow 1 names over the public API, so TF1 training code ports line by line.

TF1 scales L2 by one half: ``l2_regularizer(s)(w) == s * sum(w**2) / 2``, which is Keras's
``l2(s / 2)`` and what ``SGD(weight_decay=s)`` applies.

Examples:
    >>> import torch
    >>> from regcollect.compat import v1
    >>> float(v1.l2_regularizer(0.5)(torch.tensor([2.0])))  # 0.5 * 4 / 2
    1.0
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .. import context
from ..context import active_collection, current_prefix, defaults_scope
from ..penalties import Coefficient
from ..regularizers import L1, L1L2, L2, Regularizer, check_coefficient, fused_terms, register
from ..regularizers import get as get_regularizer
from ..schedules import Schedule

__all__ = [
    "AUTO_REUSE",
    "GraphKeys",
    "apply_regularization",
    "get_collection",
    "get_regularization_loss",
    "get_regularization_losses",
    "l1_l2_regularizer",
    "l1_regularizer",
    "l2_regularizer",
    "sum_regularizer",
    "variable_scope",
]


AUTO_REUSE = "auto_reuse"  # tf.compat.v1.AUTO_REUSE

# The layer arguments of rc.nn that name variables: what TF1's variable_scope regularizer
# reaches (tf.layers create every weight through get_variable, which falls back to it).
_WEIGHT_ARGUMENTS = (
    "kernel_regularizer",
    "bias_regularizer",
    "recurrent_regularizer",
    "embeddings_regularizer",
    "gamma_regularizer",
    "beta_regularizer",
)


@contextmanager
def variable_scope(
    name_or_scope: str | None,
    default_name: str | None = None,
    values: Any = None,
    regularizer: Any = None,
    reuse: Any = None,
    **unsupported: Any,
) -> Iterator[None]:
    """TF1's ``variable_scope``: names entries ``name/...`` and regularizes every weight of the
    ``rc.nn`` layers made inside with ``regularizer`` (kernels **and** biases, recurrent
    kernels, embeddings, normalisation gamma/beta: every variable TF1's ``tf.layers`` made
    through ``get_variable``), unless a layer is given its own.

    ``reuse`` (``True``, ``AUTO_REUSE``) is accepted and has nothing to do: PyTorch reuses a
    layer by calling the same module, not by looking up variables by name. ``values`` is
    ignored, as in TF2's graph-less mode. Other TF1 arguments (``initializer``,
    ``partitioner``, ``custom_getter``, ...) have no PyTorch meaning and raise.

    Examples:
        >>> import regcollect as rc
        >>> from regcollect.compat import v1
        >>> with v1.variable_scope("dense", regularizer=v1.l2_regularizer(0.1)):
        ...     layer = rc.nn.Linear(2, 2)
        >>> layer.kernel_regularizer, layer.bias_regularizer
        (L2(l2=0.05), L2(l2=0.05))
    """
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise TypeError(
            f"variable_scope(): {', '.join(given)} has no PyTorch equivalent; build the layers "
            "with those settings instead (regcollect only handles regularizer=)"
        )
    if reuse not in (None, True, False, AUTO_REUSE):
        raise ValueError(f"reuse must be None, True, False or AUTO_REUSE, got {reuse!r}")
    name = name_or_scope if name_or_scope is not None else default_name
    if name is None:
        raise ValueError("variable_scope: name_or_scope or default_name must be given")
    reg = get_regularizer(regularizer)
    with defaults_scope(name, dict.fromkeys(_WEIGHT_ARGUMENTS, reg)):
        yield


def get_regularization_loss(
    scope: str | None = None, name: str = "total_regularization_loss"
) -> torch.Tensor:
    """TF1's ``get_regularization_loss(scope, name)``: the sum of the penalties whose names
    match ``scope``. ``name`` named the TF op; accepted and unused."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    return context.get_regularization_loss(scope)


def get_regularization_losses(scope: str | None = None) -> list[torch.Tensor]:
    """TF1's ``get_regularization_losses(scope)``: one penalty per entry, in registration order."""
    return context.get_regularization_losses(scope)


class GraphKeys:
    """The collection keys regcollect understands."""

    REGULARIZATION_LOSSES = "regularization_losses"


def l1_regularizer(scale: float) -> L1:
    """``scale * sum(abs(w))``."""
    return L1(check_coefficient("scale", scale))


def l2_regularizer(scale: float) -> L2:
    """``scale * sum(w**2) / 2`` (TF1 scaling), i.e. ``L2(scale / 2)``."""
    return L2(check_coefficient("scale", scale) / 2.0)


def l1_l2_regularizer(scale_l1: float = 1.0, scale_l2: float = 1.0) -> L1L2:
    """``scale_l1 * sum(abs(w)) + scale_l2 * sum(w**2) / 2``."""
    return L1L2(
        l1=check_coefficient("scale_l1", scale_l1),
        l2=check_coefficient("scale_l2", scale_l2) / 2.0,
    )


@register("Sum")
class Sum(Regularizer):
    """The sum of several regularizers (TF1's ``sum_regularizer``)."""

    def __init__(self, regularizers: Sequence[Any]) -> None:
        if isinstance(regularizers, (str, bytes)) or not isinstance(regularizers, Sequence):
            raise TypeError(f"regularizer_list must be a list, got {type(regularizers).__name__}")
        self.regularizers = [get_regularizer(r) for r in regularizers if r is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = [reg(x) for reg in self.regularizers if reg is not None]
        return torch.stack(values).sum() if values else torch.zeros((), device=x.device)

    def terms(self) -> tuple[tuple[str, Coefficient], ...] | None:
        out: list[tuple[str, Coefficient]] = []
        for reg in self.regularizers:
            terms = fused_terms(reg) if reg is not None else ()
            if terms is None:
                return None
            out.extend(terms)
        return tuple(out)

    def schedules(self) -> list[Schedule]:
        return [s for reg in self.regularizers if reg is not None for s in reg.schedules()]

    def get_config(self) -> dict[str, Any]:
        from ..regularizers import serialize

        return {"regularizers": [serialize(r) for r in self.regularizers if r is not None]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sum:
        return cls(config.get("regularizers", []))


def sum_regularizer(regularizer_list: Sequence[Any]) -> Sum | None:
    """A regularizer adding up ``regularizer_list``; None for an empty list, as in TF1."""
    result = Sum(regularizer_list)
    return result if result.regularizers else None


def apply_regularization(
    regularizer: Any, weights_list: Iterable[torch.Tensor] | None = None
) -> torch.Tensor:
    """Penalise each weight, add the penalties to the collection, and return their sum.

    The weights keep counting in ``get_regularization_loss()`` afterwards (as the TF1 graph
    would); calling again on the same weights replaces, never double counts.
    """
    reg = get_regularizer(regularizer)
    if reg is None:
        raise ValueError("regularizer must not be None")
    if isinstance(weights_list, torch.Tensor) or not isinstance(weights_list, Iterable):
        weights = []
    else:
        weights = list(weights_list)  # any iterable, as TF accepted: model.parameters() too
    if not weights:
        raise ValueError(
            "weights_list must be a non-empty iterable of tensors (PyTorch has no global "
            f"weights collection to default to), got {weights_list!r}"
        )
    collection = active_collection()
    values = []
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights_list[{i}] must be a torch.Tensor, got {type(w).__name__}")
        collection.add_tensor(w, reg, name="tensor", prefix=current_prefix())
        values.append(reg(w))
    collection.mark_consumed()  # the caller adds the returned sum to its loss
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).sum()


def get_collection(key: str, scope: str | None = None) -> list[torch.Tensor]:
    """``get_collection(GraphKeys.REGULARIZATION_LOSSES, scope)``: the per-entry penalties."""
    if key != GraphKeys.REGULARIZATION_LOSSES:
        raise ValueError(
            f"regcollect only keeps the {GraphKeys.REGULARIZATION_LOSSES!r} collection "
            f"(GraphKeys.REGULARIZATION_LOSSES), got key {key!r}"
        )
    return get_regularization_losses(scope)
