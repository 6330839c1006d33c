"""regcollect: Keras-style regularization for PyTorch, collected in one place.

Examples:
    >>> import torch, regcollect as rc
    >>> model = torch.nn.Sequential(rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.01)))
    >>> total = rc.loss()          # add it to the task loss, then backward()
    >>> total.shape
    torch.Size([])
"""

import sys as _sys
import types as _types

from . import compat, integrations, nn, regularizers, schedules
from ._attach import add_activity_regularizer, add_regularizer, regularize
from ._checks import RegcollectWarning
from ._collection import Collection
from ._context import (
    assert_finite,
    attach_optimizer,
    get_collection,
    get_regularization_loss,
    get_regularization_losses,
    loss,
    penalties,
    scope,
    summary,
)
from ._entries import Entry
from ._handle import Handle
from ._persist import export_plan, load_plan
from .regularizers import (
    L1,
    L1L2,
    L2,
    L2SP,
    GroupLasso,
    Orthogonal,
    OrthogonalRegularizer,
    Regularizer,
    deserialize,
    group_lasso,
    l1,
    l1_l2,
    l2,
    l2sp,
    orthogonal,
    register,
    serialize,
)

__version__ = "0.1.0"

# Checkpoints pickled before the internal modules became private, or before each penalty had
# its own module, name the regularizer classes and the collection by their old module paths
# (regcollect.penalties.L2, regcollect._beyond.L2SP, ...): those paths still resolve for
# unpickling, without becoming attributes of the package (where rc.penalties and rc.summary
# are the functions).
_sys.modules[f"{__name__}._penalties"].__dict__.update({"L1": L1, "L2": L2, "L1L2": L1L2})
for _old, _parts in (
    ("penalties", ("_penalties", "_l1l2", "_orthogonal")),
    ("beyond", ("_l2sp", "_group_lasso")),
    ("_beyond", ("_l2sp", "_group_lasso")),
    ("collection", ("_collection",)),
    ("entries", ("_entries",)),
    ("handle", ("_handle",)),
):
    _legacy = _types.ModuleType(f"{__name__}.{_old}")
    for _part in _parts:
        _legacy.__dict__.update(
            {k: v for k, v in vars(_sys.modules[f"{__name__}.{_part}"]).items() if k[:2] != "__"}
        )
    _sys.modules.setdefault(_legacy.__name__, _legacy)
del _old, _parts, _part, _legacy


__all__ = [
    "Collection",
    "Entry",
    "Handle",
    "RegcollectWarning",
    "L1",
    "L1L2",
    "L2",
    "L2SP",
    "GroupLasso",
    "Orthogonal",
    "OrthogonalRegularizer",
    "Regularizer",
    "add_activity_regularizer",
    "add_regularizer",
    "assert_finite",
    "attach_optimizer",
    "compat",
    "deserialize",
    "export_plan",
    "get_collection",
    "get_regularization_loss",
    "get_regularization_losses",
    "group_lasso",
    "integrations",
    "l1",
    "l1_l2",
    "l2",
    "l2sp",
    "load_plan",
    "loss",
    "nn",
    "orthogonal",
    "penalties",
    "register",
    "regularizers",
    "regularize",
    "schedules",
    "scope",
    "serialize",
    "summary",
]


def __dir__() -> list[str]:
    """The public API: what ``__all__`` lists (internal modules are private)."""
    return sorted([*__all__, "__version__"])
