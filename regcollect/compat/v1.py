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

import numbers
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .. import _context
from .._context import active_collection, current_prefix, defaults_scope
from .._penalties.base import Coefficient, Term
from .._penalties.kernel import Kernel, kernel_of, register_kernel
from ..regularizers import L1, L1L2, L2, Regularizer, check_coefficient, register, serialize
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

    Args:
        name_or_scope: The scope's name.
        default_name: The name when ``name_or_scope`` is None.
        values: Ignored.
        regularizer: The default regularizer of every weight made inside.
        reuse: None, True, False or ``AUTO_REUSE``; nothing to do in PyTorch.
        **unsupported: Other TF1 arguments; any that is not None raises.

    Returns:
        A context manager.

    Raises:
        TypeError: A TF1 argument with no PyTorch meaning.
        ValueError: A bad ``reuse``, or neither ``name_or_scope`` nor ``default_name``.

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
    match ``scope``. ``name`` named the TF op; accepted and unused.

    Args:
        scope: A regular expression matched at the start of entry names, or None for all.
        name: Ignored (a string).

    Returns:
        ``rc.loss(scope)``: a differentiable 0-dim tensor.

    Raises:
        TypeError: ``name`` is not a string.

    Examples:
        >>> import regcollect as rc
        >>> from regcollect.compat import v1
        >>> with v1.variable_scope("v1docs", regularizer=v1.l2_regularizer(0.1)):
        ...     layer = rc.nn.Linear(2, 2)
        >>> total = v1.get_regularization_loss(scope="v1docs/")
        >>> bool(total > 0)
        True
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    return _context.get_regularization_loss(scope)


def get_regularization_losses(scope: str | None = None) -> list[torch.Tensor]:
    """TF1's ``get_regularization_losses(scope)``: one penalty per entry, in registration order.

    Args:
        scope: A regular expression matched at the start of entry names, or None for all.

    Returns:
        A list of differentiable 0-dim tensors.

    Examples:
        >>> import regcollect as rc
        >>> from regcollect.compat import v1
        >>> with v1.variable_scope("v1many", regularizer=v1.l1_regularizer(0.1)):
        ...     layer = rc.nn.Linear(2, 2)
        >>> len(v1.get_regularization_losses(scope="v1many/"))   # kernel and bias
        2
    """
    return _context.get_regularization_losses(scope)


class GraphKeys:
    """The collection keys regcollect understands.

    Examples:
        >>> from regcollect.compat import v1
        >>> v1.GraphKeys.REGULARIZATION_LOSSES
        'regularization_losses'
    """

    REGULARIZATION_LOSSES = "regularization_losses"


def _scale(name: str, value: object) -> float:
    """A TF1 scale: a float >= 0; an integer is refused, as ``tf.contrib.layers`` refuses it
    (``scale=1`` is most often a typo for a much smaller number)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        raise ValueError(f"{name} cannot be an integer: {value!r} (TF1 refuses it too)")
    return check_coefficient(name, value)


def l1_regularizer(scale: float) -> L1:
    """``scale * sum(abs(w))``.

    Args:
        scale: The coefficient (a float >= 0).

    Returns:
        ``L1(scale)``.

    Examples:
        >>> from regcollect.compat import v1
        >>> v1.l1_regularizer(0.1)
        L1(l1=0.1)
    """
    return L1(_scale("scale", scale))


def l2_regularizer(scale: float) -> L2:
    """``scale * sum(w**2) / 2`` (TF1 scaling), i.e. ``L2(scale / 2)``.

    Args:
        scale: The coefficient (a float >= 0).

    Returns:
        ``L2(scale / 2)``.

    Examples:
        >>> from regcollect.compat import v1
        >>> v1.l2_regularizer(0.1)
        L2(l2=0.05)
    """
    return L2(_scale("scale", scale) / 2.0)


def l1_l2_regularizer(scale_l1: float = 1.0, scale_l2: float = 1.0) -> L1L2:
    """``scale_l1 * sum(abs(w)) + scale_l2 * sum(w**2) / 2``.

    Args:
        scale_l1: The L1 coefficient (a float >= 0).
        scale_l2: The L2 coefficient, TF1-scaled (a float >= 0).

    Returns:
        ``L1L2(l1=scale_l1, l2=scale_l2 / 2)``.

    Examples:
        >>> from regcollect.compat import v1
        >>> v1.l1_l2_regularizer(0.1, 0.1)
        L1L2(l1=0.1, l2=0.05)
    """
    return L1L2(
        l1=_scale("scale_l1", scale_l1),
        l2=_scale("scale_l2", scale_l2) / 2.0,
    )


@register("Sum")
class Sum(Regularizer):
    """The sum of several regularizers (TF1's ``sum_regularizer``), at most ``MAX_TERMS``
    of them counting nested sums: every training step pays for each (a plan loaded from an
    untrusted file cannot make it pay a thousand times)."""

    MAX_TERMS = 64

    def __init__(self, regularizers: Sequence[Any]) -> None:
        if isinstance(regularizers, (str, bytes)) or not isinstance(regularizers, Sequence):
            raise TypeError(f"regularizer_list must be a list, got {type(regularizers).__name__}")
        if len(regularizers) > self.MAX_TERMS:  # before resolving any
            raise ValueError(self._too_many(len(regularizers)))
        self.regularizers = [get_regularizer(r) for r in regularizers if r is not None]
        count = sum(len(r.regularizers) if isinstance(r, Sum) else 1 for r in self.regularizers)
        if count > self.MAX_TERMS:
            raise ValueError(self._too_many(count))

    def _too_many(self, count: int) -> str:
        return (
            f"a Sum of {count} regularizers; at most {self.MAX_TERMS} (each costs every "
            "training step: add the coefficients of equal ones)"
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = [reg(x) for reg in self.regularizers if reg is not None]
        return torch.stack(values).sum() if values else torch.zeros((), device=x.device)

    def get_config(self) -> dict[str, Any]:
        return {"regularizers": [serialize(r) for r in self.regularizers if r is not None]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sum:
        return cls(config.get("regularizers", []))


class _SumKernel(Kernel):
    """A TF1 sum as the engine sees it: its members' p-norm parts, computed with every other
    such part, equal terms with constant coefficients merged into one; a member that is more
    than those (its own formula, a reference) makes the sum a formula, called."""

    def terms(self, reg: Any) -> tuple[tuple[Term, Coefficient], ...]:
        # Each member's terms once: a nested sum would otherwise ask its members twice a level.
        member_terms = [kernel_of(m).terms(m) for m in reg.regularizers if m is not None]
        parts = [part for terms in member_terms for part in terms]
        if not all(member_terms) or not all(term.p for term, _ in parts):
            return ()
        merged: dict[Any, tuple[Term, Coefficient]] = {}
        for term, coef in parts:
            if isinstance(coef, Schedule):
                merged[(term, id(coef))] = (term, coef)
            else:
                _, total = merged.get(term, (term, 0.0))
                merged[term] = (term, total + coef)  # type: ignore[operator]
        return tuple(merged.values())

    def schedules(self, reg: Any) -> list[Schedule]:
        return [s for m in reg.regularizers if m is not None for s in kernel_of(m).schedules(m)]


register_kernel(Sum, _SumKernel())


def sum_regularizer(regularizer_list: Sequence[Any]) -> Sum | None:
    """A regularizer adding up ``regularizer_list``; None for an empty list, as in TF1.

    Args:
        regularizer_list: Regularizers (or anything ``rc.regularizers.get`` accepts);
            None items are skipped.

    Returns:
        A ``Sum``, or None when nothing is left.

    Examples:
        >>> import torch
        >>> from regcollect.compat import v1
        >>> reg = v1.sum_regularizer([v1.l1_regularizer(1.0), v1.l2_regularizer(1.0)])
        >>> float(reg(torch.tensor([2.0])))   # 2 + 4 / 2
        4.0
    """
    result = Sum(regularizer_list)
    return result if result.regularizers else None


def apply_regularization(
    regularizer: Any, weights_list: Iterable[torch.Tensor] | None = None
) -> torch.Tensor:
    """Penalise each weight, add the penalties to the collection, and return their sum.

    The weights keep counting in ``get_regularization_loss()`` afterwards (as the TF1 graph
    would); calling again on the same weights replaces, never double counts.

    Args:
        regularizer: The penalty (anything ``rc.regularizers.get`` accepts, not None).
        weights_list: The tensors to penalise (any non-empty iterable, such as
            ``model.parameters()``).

    Returns:
        The sum of the penalties, a differentiable 0-dim tensor.

    Raises:
        ValueError: ``regularizer`` is None, or ``weights_list`` is empty or missing.
        TypeError: An item of ``weights_list`` is not a tensor.

    Examples:
        >>> import torch
        >>> from regcollect.compat import v1
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> total = v1.apply_regularization(v1.l2_regularizer(1.0), [w])
        >>> float(total.detach())   # 25 / 2
        12.5
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
        collection.register_tensor(w, reg, "tensor", prefix=current_prefix())
        values.append(reg(w))
    collection.mark_consumed()  # the caller adds the returned sum to its loss
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).sum()


def get_collection(key: str, scope: str | None = None) -> list[torch.Tensor]:
    """``get_collection(GraphKeys.REGULARIZATION_LOSSES, scope)``: the per-entry penalties.

    Args:
        key: ``GraphKeys.REGULARIZATION_LOSSES`` (the only collection kept).
        scope: A regular expression matched at the start of entry names, or None for all.

    Returns:
        ``get_regularization_losses(scope)``.

    Raises:
        ValueError: Any other ``key``.

    Examples:
        >>> from regcollect.compat import v1
        >>> losses = v1.get_collection(v1.GraphKeys.REGULARIZATION_LOSSES, scope="nothing/")
        >>> losses
        []
    """
    if key != GraphKeys.REGULARIZATION_LOSSES:
        raise ValueError(
            f"regcollect only keeps the {GraphKeys.REGULARIZATION_LOSSES!r} collection "
            f"(GraphKeys.REGULARIZATION_LOSSES), got key {key!r}"
        )
    return get_regularization_losses(scope)
