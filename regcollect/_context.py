"""Scopes, the active collection, and the top-level functions users call.

The only global state of regcollect is here: the stack of active ``scope`` blocks (a
context variable, so threads and tasks each have their own) and the default collection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import torch

from ._checks import ScopeArg, keywords_checked
from ._collection.collection import Collection, default_collection
from ._collection.summary import Summary, View
from ._state import SCOPES
from ._torch_compat import is_compiling
from .regularizers import Regularizer, RegularizerArg
from .regularizers import get as get_regularizer

__all__ = [
    "active_collection",
    "assert_finite",
    "current_prefix",
    "defaults_scope",
    "get_collection",
    "get_regularization_loss",
    "get_regularization_losses",
    "loss",
    "penalties",
    "scope",
    "scope_default",
    "summary",
]


@dataclass(frozen=True)
class _ScopeFrame:
    name: str
    defaults: dict[str, Regularizer | None]
    collection: Collection | None


def _check_collection(collection: object) -> Collection | None:
    if collection is not None and not isinstance(collection, Collection):
        raise TypeError(
            f"collection must be a regcollect.Collection, got {type(collection).__name__}"
        )
    return collection


@contextmanager
@keywords_checked
def scope(
    name: str,
    *,
    kernel_regularizer: RegularizerArg = None,
    bias_regularizer: RegularizerArg = None,
    activity_regularizer: RegularizerArg = None,
    collection: Collection | None = None,
) -> Iterator[None]:
    """Name entries made inside ``name/...`` and give layers made inside default regularizers.

    Like TF1's ``variable_scope(regularizer=...)``: a layer built inside takes the scope's
    ``kernel_regularizer``/``bias_regularizer``/``activity_regularizer`` for the arguments it
    was not given explicitly. Scopes nest (``"encoder/block1/..."``); inner defaults win.

    Args:
        name: the scope's name; entries made inside are named ``name/...``.
        kernel_regularizer: default for layers' ``kernel_regularizer`` argument.
        bias_regularizer: default for layers' ``bias_regularizer`` argument.
        activity_regularizer: default for layers' ``activity_regularizer`` argument.
        collection: the collection layers made inside register in.

    Returns:
        A context manager; entries and layers made inside it take the name and defaults.

    Raises:
        ValueError: ``name`` is empty or not a string; a default is not a regularizer.
        TypeError: ``collection`` is not a ``Collection``.

    Examples:
        >>> import regcollect as rc
        >>> with rc.scope("encoder", kernel_regularizer=rc.l2(1e-4)):
        ...     layer = rc.nn.Linear(2, 2)
        >>> layer.kernel_regularizer
        L2(l2=0.0001)
    """
    defaults = {
        "kernel_regularizer": get_regularizer(kernel_regularizer),
        "bias_regularizer": get_regularizer(bias_regularizer),
        "activity_regularizer": get_regularizer(activity_regularizer),
    }
    with defaults_scope(name, defaults, collection):
        yield


@contextmanager
def defaults_scope(
    name: str, defaults: dict[str, Regularizer | None], collection: Collection | None = None
) -> Iterator[None]:
    """``scope`` with any layer arguments' defaults (``{"gamma_regularizer": ...}``)."""
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"scope name must be a non-empty string, got {name!r}")
    _check_collection(collection)
    frame = _ScopeFrame(name.strip("/"), defaults, collection)
    token = SCOPES.set((*SCOPES.get(), frame))
    try:
        yield
    finally:
        SCOPES.reset(token)


def current_prefix() -> str:
    """``"outer/inner/"`` for the active scopes, ``""`` outside any."""
    return "".join(frame.name + "/" for frame in SCOPES.get())


def scope_default(argument: str) -> Regularizer | None:
    """The innermost active scope's default for a layer argument such as ``kernel_regularizer``."""
    for frame in reversed(SCOPES.get()):
        reg = frame.defaults.get(argument)
        if reg is not None:
            return reg
    return None


def active_collection(explicit: Collection | None = None) -> Collection:
    """``explicit`` if given, else the innermost scope's collection, else the default one."""
    if explicit is None and is_compiling():
        # Scopes are a model-building tool; torch.compile cannot trace ContextVar reads.
        return default_collection()
    if _check_collection(explicit) is not None:
        return explicit  # type: ignore[return-value]
    for frame in reversed(SCOPES.get()):
        if frame.collection is not None:
            return frame.collection
    return default_collection()


def get_collection() -> Collection:
    """The default collection, used when no ``collection=`` is given.

    Returns:
        The process-wide default ``Collection``.

    Examples:
        >>> import regcollect as rc
        >>> rc.get_collection() is rc.get_collection()
        True
    """
    return default_collection()


@keywords_checked
def loss(scope: ScopeArg = None, *, collection: Collection | None = None) -> torch.Tensor:
    """Total regularization loss; add it to the task loss before ``backward()``.

    Args:
        scope: None for every entry of the collection; a regular expression matched at the
            start of entry names (``"decoder/"``, TensorFlow semantics); or an ``nn.Module``
            or a list of them: only the entries in those modules' subtrees — their weights and
            the activity penalties their layers recorded (Keras's ``model.losses``).
        collection: the collection (default: the active one).

    Returns:
        A 0-dim tensor, differentiable, on the parameters' device, float32 at least;
        ``tensor(0.)`` when nothing is registered. No host synchronisation.

    Raises:
        ValueError: ``scope`` is an invalid regular expression or an empty list.
        TypeError: ``scope`` is neither a string, a module nor a list of modules.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5)))
        >>> total = rc.loss(model)     # only this model's penalties
        >>> torch.allclose(total, 0.5 * model[0].weight.pow(2).sum())
        True
    """
    return active_collection(collection).loss(scope)


get_regularization_loss = loss


@keywords_checked
def get_regularization_losses(
    scope: ScopeArg = None, *, collection: Collection | None = None
) -> list[torch.Tensor]:
    """One differentiable tensor per contributing entry, in registration order.

    Args:
        scope: as for ``loss``.
        collection: the collection (default: the active one).

    Returns:
        A list of 0-dim tensors, one per entry that contributes (trainable weights, and
        activity entries with penalties recorded since the last call).

    Examples:
        >>> import torch, regcollect as rc
        >>> model = rc.nn.Linear(2, 2, kernel_regularizer="l2", bias_regularizer="l1")
        >>> len(rc.get_regularization_losses(model))   # weight and bias
        2
    """
    return active_collection(collection).losses(scope)


@keywords_checked
def assert_finite(scope: ScopeArg = None, *, collection: Collection | None = None) -> None:
    """Raise ``FloatingPointError`` naming the entries whose last penalty is NaN or inf.

    Args:
        scope: as for ``loss``.
        collection: the collection (default: the active one).

    Raises:
        FloatingPointError: some entry's last value is NaN or infinite.

    Examples:
        >>> import torch, regcollect as rc
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.1))
        >>> with torch.no_grad():
        ...     layer.weight[0, 0] = float("inf")
        >>> _ = rc.loss(layer)
        >>> rc.assert_finite(layer)
        Traceback (most recent call last):
        ...
        FloatingPointError: ...
    """
    active_collection(collection).assert_finite(scope)


@keywords_checked
def penalties(
    scope: ScopeArg = None,
    *,
    collection: Collection | None = None,
    by: View = "entry",
    depth: int | None = None,
    prefix: str | None = None,
) -> dict[str, float]:
    """``{name: value, ..., "total": sum}`` from the last ``loss()``, for loggers.

    Args:
        scope: as for ``loss``; with a model, names are unique within it (``"0.weight"``).
        collection: the collection (default: the active one).
        by: ``"entry"`` (default), ``"module"`` (a value per module, the rows
            ``summary(by="module")`` shows) or ``"total"`` (the total alone).
        depth: with ``by="module"``, as for ``summary``.
        prefix: keys for a logger (W&B, MLflow, TensorBoard): the sum under
            ``{prefix}total`` and each value under ``{prefix}penalty/{entry}`` (``by="module"``:
            ``{prefix}module/{module}``), so that no parameter or module name can take the
            sum's key. The loggers in ``regcollect.integrations`` write these keys.

    Returns:
        Entry names mapped to their last penalty (entries never evaluated are left out), plus
        ``"total"`` (``"total (sum)"`` when an entry itself is named ``total``); with
        ``prefix``, the logger keys. One device-to-host copy.

    Raises:
        ValueError: an unknown ``by``, or a ``depth`` that is no positive int.
        TypeError: a ``prefix`` that is no string.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5)))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> _ = rc.loss(model)
        >>> rc.penalties(model)
        {'0.weight': 2.0, 'total': 2.0}
        >>> rc.penalties(model, prefix="reg/")
        {'reg/penalty/0.weight': 2.0, 'reg/total': 2.0}
    """
    return active_collection(collection).penalties(scope, by=by, depth=depth, prefix=prefix)


@keywords_checked
def summary(
    loss: torch.Tensor | float | None = None,
    scope: ScopeArg = None,
    *,
    tablefmt: str = "simple",
    file: IO[str] | None = None,
    top: int | None = None,
    by: View = "entry",
    depth: int | None = None,
    collection: Collection | None = None,
) -> Summary:
    """Show (print, or in a notebook display) and return a table of each penalty's contribution.

    One row per entry: name, shape, regularizer, penalty, share of the regularization total and,
    when ``loss`` (the total training loss) is given, share of it; then a total row. Values are
    those of the last ``loss()`` call, fetched with one device-to-host copy; ``-`` marks entries
    no call has evaluated (registered since, or frozen). A schedule shows the value, kind and
    step its row was computed with (``L2(l2=0.0075 linear@3)``), not the step an
    ``optimizer.step()`` since has moved it to; after a compiled ``loss()``, its current step.

    The result is a ``str`` (the table in ``tablefmt``) that Jupyter renders as an HTML table
    (as Markdown with ``tablefmt="github"``), shown once: in a notebook the call displays it
    and the cell does not repeat it. ``str(table)`` is the text; ``file=io.StringIO()`` gets it
    without printing.

    Args:
        loss: the total training loss (tensor or number), for the "% of loss" column
            (``-`` where it is not positive; a footnote when it is smaller than the penalties
            it should include: the data loss alone, most likely).
        scope: as for ``loss``.
        tablefmt: a ``tabulate`` format name.
        file: where to print (default: stdout, or the notebook's display).
        top: keep the ``top`` largest rows, largest first, and fold the rest into one
            ``others`` row.
        by: ``"entry"`` (a row per entry), ``"module"`` (a row per module: the sum of its
            entries) or ``"total"`` (the total alone).
        depth: with ``by="module"``, group by the first ``depth`` dotted parts of the module
            names (``depth=1``: one row per top-level block).
        collection: the collection (default: the active one).

    Returns:
        The table, a ``str``.

    Raises:
        ValueError: An unknown ``tablefmt`` or ``by``; ``top`` or ``depth`` below 1.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5)))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> _ = rc.loss(model)
        >>> rc.summary(scope=model)
        name      shape    regularizer      penalty    % of reg.
        --------  -------  -------------  ---------  -----------
        0.weight  2x2      L2(l2=0.5)             2      100.00%
        total                                     2      100.00%
        <regcollect summary: 1 row, total 2>
        >>> _ = rc.summary(scope=model, by="total")
        name      penalty
        ------  ---------
        total           2
    """
    return active_collection(collection).summary(
        loss, scope, tablefmt=tablefmt, file=file, top=top, by=by, depth=depth
    )
