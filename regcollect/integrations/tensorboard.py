"""Log each penalty, the total and optionally weight norms and histograms to TensorBoard.

Examples:
    >>> from torch.utils.tensorboard import SummaryWriter     # doctest: +SKIP
    >>> writer = SummaryWriter("runs/exp1")                   # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                # doctest: +SKIP
    ...     total = criterion(model(x), y) + rc.loss()
    ...     total.backward(); optimizer.step(); optimizer.zero_grad()
    ...     if step % 100 == 0:
    ...         log_penalties(writer, step)

Values are those of the last ``rc.loss()``: one device-to-host copy, no recomputation.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from . import require

require("tensorboard", "tensorboard", __name__)

from .._collection.collection import Collection  # noqa: E402
from .._collection.entries import WEIGHT  # noqa: E402
from .._context import active_collection  # noqa: E402

__all__ = ["log_penalties"]


def log_penalties(
    writer: Any,
    step: int,
    *,
    prefix: str = "regularization",
    scope: str | None = None,
    collection: Collection | None = None,
    weight_norms: bool = False,
    histograms: bool = False,
) -> dict[str, float]:
    """Write ``{prefix}/total`` and ``{prefix}/penalty/{entry name}`` scalars for the last
    ``loss()``.

    ``weight_norms`` adds ``{prefix}/norm/{name}`` (the L2 norm of each regularized weight);
    ``histograms`` adds ``{prefix}/weights/{name}`` histograms. Each kind of tag has its own
    namespace, so no entry name (a root parameter called ``total``, a scope called ``norm``)
    can write over another tag. The penalties are those of the last ``loss()`` (the weights
    before the step that followed it); norms and histograms are of the weights now.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``
            and ``add_histogram``).
        step: The global step of the scalars.
        prefix: The tag prefix.
        scope: As for ``rc.loss``.
        collection: The collection (default: the active one).
        weight_norms: Also log the L2 norm of each regularized weight.
        histograms: Also log a histogram of each regularized weight.

    Returns:
        The scalars logged, ``{tag: value}``: ``rc.penalties(scope, prefix=prefix + "/")``.

    Raises:
        TypeError: ``writer`` has no ``add_scalar``.
        ValueError: A negative or non-int ``step``, or an empty ``prefix``.

    Examples:
        >>> import tempfile, torch, regcollect as rc
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from regcollect.integrations.tensorboard import log_penalties
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5)))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> _ = rc.loss(model)
        >>> with tempfile.TemporaryDirectory() as logdir, SummaryWriter(logdir) as writer:
        ...     log_penalties(writer, step=0, scope=model)
        {'regularization/penalty/0.weight': 2.0, 'regularization/total': 2.0}
    """
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"writer must be a SummaryWriter (with add_scalar), got {type(writer).__name__}"
        )
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    step = int(step)  # numpy integers (enumerate over an array) too
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    coll = active_collection(collection)
    values = coll.penalties(scope, prefix=f"{prefix}/")
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
    if weight_norms or histograms:
        weights = [(e.name, e.resolve()) for e in coll.entries(scope) if e.kind == WEIGHT]
        live = [(name, t.detach()) for name, t in weights if t is not None]
        if weight_norms and live:
            norms = torch.stack([t.float().norm() for _, t in live]).tolist()  # one copy
            for (name, _), norm in zip(live, norms):
                writer.add_scalar(f"{prefix}/norm/{name}", norm, step)
        if histograms:
            for name, t in live:
                writer.add_histogram(f"{prefix}/weights/{name}", t.float().cpu(), step)
    return values
