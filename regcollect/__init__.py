"""regcollect: Keras-style regularization for PyTorch, collected in one place.

Examples:
    >>> import torch, regcollect as rc
    >>> model = torch.nn.Sequential(rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.01)))
    >>> total = rc.loss()          # add it to the task loss, then backward()
    >>> total.shape
    torch.Size([])
"""

from . import compat, integrations, nn, regularizers, schedules
from ._attach import add_activity_regularizer, add_regularizer, regularize
from ._checks import RegcollectWarning
from ._collection.collection import Collection
from ._collection.entries import Entry
from ._collection.handle import Handle
from ._context import (
    assert_finite,
    get_collection,
    get_regularization_loss,
    get_regularization_losses,
    loss,
    penalties,
    scope,
    summary,
)
from ._persist import export_plan, load_plan
from ._stepping import attach_optimizer, param_groups
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
    "param_groups",
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
