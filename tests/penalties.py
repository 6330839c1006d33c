"""One table of the penalties regcollect ships (as torch's ``OptimizerInfo`` lists the
optimizers): how to build each, its formula in float64, written from its docstring and not from
its code, and what the generic tests in ``tests/test_penalties.py`` may ask of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import regcollect as rc
from regcollect.compat import v1

Formula = Callable[[torch.Tensor], torch.Tensor]


def _orthogonal(factor: float, vectors: Callable[[torch.Tensor], torch.Tensor]) -> Formula:
    """Keras's ``factor * 0.5 * sum(|P * (1 - I)|) / (s (s - 1) / 2)``, ``P`` the Gram matrix
    of the ``s`` L2-normalised vectors."""

    def formula(w: torch.Tensor) -> torch.Tensor:
        v = vectors(w.reshape(w.shape[0], -1))
        v = v / v.norm(dim=1, keepdim=True)
        s = v.shape[0]
        off = (v @ v.T) * (1 - torch.eye(s, dtype=w.dtype))
        return factor * 0.5 * off.abs().sum() / (s * (s - 1) / 2)

    return formula


REFERENCE = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4)


@dataclass(frozen=True)
class PenaltyInfo:
    """``make()`` builds the penalty; ``formula(w)`` is its value on a tensor called directly
    (float64); ``shape`` the tensor tried; ``serializable``: ``get_config``/``serialize``
    round-trip it; ``module``: it may be registered on a ``Linear(4, 3)`` weight (the attached
    step's comparison; an L2-SP's reference is given for that shape); ``config_is_whole``:
    its config holds all it needs to be called (an L2-SP's reference is the model's, kept in
    its buffers and checkpoints, not in the config)."""

    name: str
    make: Callable[[], rc.Regularizer]
    formula: Formula
    shape: tuple[int, ...] = (3, 4)
    serializable: bool = True
    module: bool = True
    config_is_whole: bool = True


PENALTIES = [
    PenaltyInfo("l1", lambda: rc.l1(0.3), lambda w: 0.3 * w.abs().sum()),
    PenaltyInfo("l2", lambda: rc.l2(0.2), lambda w: 0.2 * (w * w).sum()),
    PenaltyInfo(
        "l1_l2", lambda: rc.l1_l2(0.3, 0.2), lambda w: 0.3 * w.abs().sum() + 0.2 * (w * w).sum()
    ),
    PenaltyInfo("l2 on a vector", lambda: rc.l2(0.5), lambda w: 0.5 * (w * w).sum(), (7,)),
    PenaltyInfo(
        "l1 on a 4-d kernel", lambda: rc.l1(0.1), lambda w: 0.1 * w.abs().sum(), (2, 3, 2, 2)
    ),
    PenaltyInfo("orthogonal rows", lambda: rc.orthogonal(0.4), _orthogonal(0.4, lambda v: v)),
    PenaltyInfo(
        "orthogonal columns",
        lambda: rc.orthogonal(0.4, mode="columns"),
        _orthogonal(0.4, lambda v: v.T),
    ),
    PenaltyInfo(
        "group lasso rows",
        lambda: rc.group_lasso(0.3),
        lambda w: 0.3 * w.reshape(w.shape[0], -1).norm(dim=1).sum(),
    ),
    PenaltyInfo(
        "group lasso columns",
        lambda: rc.group_lasso(0.3, axis=1),
        lambda w: 0.3 * w.norm(dim=0).sum(),
    ),
    PenaltyInfo(
        "l2sp",
        lambda: rc.l2sp(0.2, reference=REFERENCE.float()),
        lambda w: 0.2 * ((w - REFERENCE.float().double()) ** 2).sum(),
        config_is_whole=False,
    ),
    PenaltyInfo("tf1 l2", lambda: v1.l2_regularizer(0.4), lambda w: 0.4 * (w * w).sum() / 2),
    PenaltyInfo(
        "tf1 sum",
        lambda: v1.sum_regularizer([v1.l1_regularizer(0.1), v1.l2_regularizer(0.4)]),
        lambda w: 0.1 * w.abs().sum() + 0.4 * (w * w).sum() / 2,
    ),
    PenaltyInfo(
        "custom",
        lambda: rc.regularizers.Custom(lambda w: 0.1 * (w**4).sum()),
        lambda w: 0.1 * (w**4).sum(),
        serializable=False,
    ),
]
