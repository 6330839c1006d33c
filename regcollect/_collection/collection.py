"""The collection: what the user holds, composed of the parts that do the work.

- ``_registry`` (``regcollect._registry.Registry``): the entries, their registration, names
  and scopes;
- ``_registry.activity`` (``regcollect._activity.Activity``): the activity penalties of the
  current forward pass;
- ``_plans`` (``regcollect._plans.PlanCache``): the cached plan of each scope;
- ``_readout`` (``regcollect._readout.Readout``): the last values, for the summary;
- ``_attachments``: the optimizers applying its penalties in their step.

``loss()`` and ``losses()`` evaluate the cached plan of a scope and read the activity penalties
of the current forward pass in that scope (a pure read); each call leaves its values on the
device for ``summary()`` and ``penalties()``. A collection pickles as a reference: unpickled
in the same process it is the same collection, elsewhere the default one.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch

from .. import _locks, _naming
from .._checks import RegcollectWarning, ScopeArg, check_scope
from .._optim.attach import OptimizerAttachment
from .._optim.groups import GroupDecay
from .._state import COLLECTIONS
from .._torch_compat import is_compiling
from .entries import ACTIVITY, Entry
from .guards import install_step_hook, model_groups, release, warn_meta, warn_models
from .plans import CachedPlan, PlanCache, View, scope_key, values_each, with_records
from .readout import Last, Readout, Row, check_finite, steps_of
from .registering import Registering
from .registry import Registry
from .summary import Summary, check_tablefmt, check_view, render, table_extra, values_by
from .summary import View as SummaryView
from .traced import traced_view

__all__ = ["Collection", "default_collection"]


class Collection(Registering):
    """An independent set of penalties. ``rc.get_collection()`` returns the default one.

    Args:
        check_finite: read every ``loss()``'s values back (one host synchronisation) and raise
            ``FloatingPointError`` naming the entries whose penalty is NaN or infinite.

    Raises:
        TypeError: ``check_finite`` is not a bool.

    Examples:
        >>> import torch, regcollect as rc
        >>> coll = rc.Collection()
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0), collection=coll)
        >>> torch.allclose(coll.loss(), layer.weight.abs().sum())
        True
    """

    def __init__(self, *, check_finite: bool = False) -> None:
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite
        self.uid = uuid.uuid4().hex
        COLLECTIONS.by_uid[self.uid] = self
        COLLECTIONS.live.add(self)
        # Whether loss()/losses() ever ran: if not when an optimizer steps over regularized
        # parameters, the penalties are not part of training and the user is told, once.
        self._consumed = False
        self._warned_forgotten = False
        self._warned_models = False
        self._warned_meta = False
        self._registry = Registry(install_step_hook, release)
        self._plans = PlanCache()
        self._plans_version = 0
        self._readout = Readout()
        # Optimizers applying this collection's penalties in their step (attach_optimizer).
        self._attachments: list[OptimizerAttachment] = []
        # Parameters whose L2 penalty param_groups() gave to an optimizer's weight_decay.
        self._decay = GroupDecay()

    # -- the registry's, for the user --

    def __len__(self) -> int:
        return len(self._registry)

    def entries(self, scope: ScopeArg = None) -> list[Entry]:
        """Live entries in registration order, optionally filtered by ``scope``.

        Args:
            scope: As for ``loss``.

        Returns:
            The entries.
        """
        return self._registry.entries(scope)

    def remove(self, module: torch.nn.Module) -> int:
        """Remove the entries on ``module`` and its submodules.

        Args:
            module: The module.

        Returns:
            How many entries were removed.
        """
        return self._registry.remove(module)

    def describe(self, entry: Entry) -> str:
        """``"entry 'name'"``, for error messages.

        Args:
            entry: An entry of this collection.

        Returns:
            The description.
        """
        return self._registry.describe(entry)

    # -- optimizers --

    def _attachment_key(self) -> tuple[Any, ...]:
        """What decides which penalties the attached optimizers apply: each one's parameter
        groups, and whether it is still alive (a dropped optimizer gives its penalties back
        to autograd), and the parameters handed to parameter groups (``param_groups``). Part
        of the plan's staleness key, with the registry's and the module tree's versions."""
        if not self._attachments:
            return (self._decay.version,)
        keys = tuple(a.key() for a in self._attachments)
        if None in keys:
            self._attachments = [a for a in self._attachments if a.optimizer() is not None]
        return (*keys, self._decay.version)

    # Collections are registries, not data: copying a model must not copy its collection, and
    # unpickling in the same process finds the same one (see _restore_collection).
    def __deepcopy__(self, memo: dict[int, Any]) -> Collection:
        return self

    def __copy__(self) -> Collection:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Collection._unpickle, (self.uid, self is COLLECTIONS.default))

    @staticmethod
    def _unpickle(uid: str, was_default: bool) -> Collection:
        return _restore_collection(uid, was_default)

    def __repr__(self) -> str:
        return f"<regcollect.Collection with {len(self)} entries>"

    def clear(self) -> None:
        """Remove every entry and every recorded activity penalty; start over as if new."""
        with self._registry.lock:
            self._registry.clear()
            self._decay.clear()
            self._plans = PlanCache()
            self._readout.clear()
            self._consumed = self._warned_forgotten = self._warned_models = False
            self._warned_meta = False

    def mark_consumed(self) -> None:
        """Say that this collection's penalties reach a loss by another route (TF1's
        ``apply_regularization`` returns them), so no forgotten-``loss()`` warning is due."""
        self._consumed = True

    # -- computing --

    def _plan(self, scope: ScopeArg) -> tuple[Any, CachedPlan]:
        checked = check_scope(scope)
        key = scope_key(checked)
        roots: Sequence[torch.nn.Module] = checked if isinstance(checked, tuple) else ()
        registry = self._registry
        with registry.lock:
            registry._cleanup()
            if self._plans_version != registry.version:  # plans of what is gone: dropped
                self._plans, self._plans_version = PlanCache(), registry.version

            def build() -> tuple[list[Entry], list[Entry]]:
                in_scope = registry._in_scope(checked)
                return in_scope, [e for e in in_scope if e.kind != ACTIVITY]

            cached = self._plans.get(
                key,
                (registry.version, _naming.version(), self._attachment_key()),
                roots,
                build,
                self._describer,
                model_groups if checked is None else None,
                self._held_by_optimizers,
            )
            return key, cached

    def _describer(self, entries: list[Entry]) -> Callable[[int], str]:
        """Names ``entries[i]`` in engine error messages (resolved only on error)."""
        return lambda i: self.describe(entries[i])

    def _evaluate(self, scope: ScopeArg, each: bool) -> list[torch.Tensor]:
        """The one evaluation behind ``loss()`` (``each`` False: ``[total]``) and ``losses()``
        (``each``: one value per entry that contributes, in registration order): the scope's
        cached view, or, while torch.compile traces, one made without lock, cache or warning.
        Its values are kept on the device for the read-back."""
        traced = is_compiling()
        view: View | None = None
        if traced:
            view = traced_view(self._registry, scope, self._held_by_optimizers())
            if view is None:
                # An engine holds a parameter in parts: its penalty is completed across the
                # ranks and its gradient handed to the engine by the eager path only.
                return torch.compiler.disable(self._evaluate)(scope, each)  # type: ignore[no-any-return]
            key = scope_key(None if scope is None else check_scope(scope))
            records = self._registry.activity.read(
                None if key is None else frozenset(map(id, view.in_scope))
            )
        else:
            key, cached = self._plan(scope)
            records = self._registry.activity.read(None if key is None else cached.in_scope_ids)
            if not each:
                self._warn_once(key, cached, records)
            view = cached
        if each:
            out, parts = values_each(view, records)
        else:
            result = view.plan()
            parts = result.parts
            out = [with_records(result.total, [v for _, v in records], len(view.entries) > 0)]
        self._readout.store(key, Last(view.entries, parts, records, view.activity, view.steps()))
        self._consumed = True
        if self.check_finite and not traced:
            self.assert_finite(scope)
        return out

    def _warn_once(self, key: Any, cached: CachedPlan, records: list[Any]) -> None:
        if key is None and not self._warned_models:
            self._warned_models = warn_models(
                cached.weight_models, cached.models, cached.in_scope, records, self._registry
            )
        if cached.meta and not self._warned_meta:
            self._warned_meta = warn_meta(cached.meta, self._registry)

    def loss(self, scope: ScopeArg = None) -> torch.Tensor:
        """Sum of the penalties in ``scope``: weights, plus the activity penalties recorded since.

        Args:
            scope: None for every entry; a regular expression matched at the start of entry
                names (``"decoder/"``); or an ``nn.Module`` (or a list of them): the entries in
                those modules' subtrees, like Keras's ``model.losses``.

        Returns:
            A 0-dim tensor, differentiable, on the parameters' device, float32 at least;
            ``tensor(0.)`` when nothing is registered. Reads nothing back to the host.
        """
        return self._evaluate(scope, each=False)[0]

    def losses(self, scope: ScopeArg = None) -> list[torch.Tensor]:
        """One differentiable 0-dim tensor per entry that contributes, in registration order.

        Each weight entry's penalty alone (use ``loss`` in training loops: one grouped
        evaluation); an activity entry gives the sum of its penalties of the last forward pass.
        As in ``loss``, a penalty an optimizer applies (``attach_optimizer``, the
        ``weight_decay`` of ``param_groups``) comes without a gradient: adding these values to
        a loss never counts it twice.

        Args:
            scope: As for ``loss``.

        Returns:
            The list of 0-dim tensors.
        """
        return self._evaluate(scope, each=True)

    # -- reading the last values --

    def _rows(
        self,
        scope: ScopeArg,
        extra: Sequence[torch.Tensor] = (),
        lasts: Sequence[Last] | None = None,
    ) -> tuple[list[Row], float, list[float]]:
        entries, names = self._registry._view(scope)
        return self._readout.rows(entries, names, extra, lasts)

    def assert_finite(self, scope: ScopeArg = None) -> None:
        """Raise ``FloatingPointError`` naming every entry whose last penalty is NaN or inf.

        Reads the values of the last ``loss`` (one device-to-host copy). Weights that are
        NaN or infinite always make ``loss()`` non-finite; this turns that into an error that
        says where. ``Collection(check_finite=True)`` runs it after every ``loss()``.

        Args:
            scope: As for ``loss``.

        Raises:
            FloatingPointError: Some entry's last value is NaN or infinite.
        """
        check_finite(self._rows(scope)[0])

    def penalties(
        self,
        scope: ScopeArg = None,
        *,
        by: SummaryView = "entry",
        depth: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """``{entry name: penalty, ..., "total": sum}`` from the last ``loss`` call.

        Args:
            scope: As for ``loss``.
            by: ``"entry"``; ``"module"`` (a value per module, as ``summary(by="module")``
                folds the rows); ``"total"`` (the total alone).
            depth: As for ``summary``.
            prefix: Logger keys: ``{prefix}total`` and ``{prefix}penalty/{entry}`` (or
                ``{prefix}module/{module}``); see ``regcollect.penalties``.

        Returns:
            The dict (one device-to-host copy).

        Raises:
            ValueError: An unknown ``by``, or a ``depth`` that is no positive int.
            TypeError: A ``prefix`` that is no string.
        """
        check_view(None, by, depth)
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
        rows, total, _ = self._rows(scope)
        return values_by(rows, total, by, depth, prefix)

    def summary(
        self,
        loss: torch.Tensor | float | None = None,
        scope: ScopeArg = None,
        *,
        tablefmt: str = "simple",
        file: IO[str] | None = None,
        top: int | None = None,
        by: SummaryView = "entry",
        depth: int | None = None,
    ) -> Summary:
        """Show and return the table of penalties; see ``regcollect.summary``.

        Args:
            loss: The total training loss, for the "% of loss" column.
            scope: As for ``loss``.
            tablefmt: A ``tabulate`` format name.
            file: Where to print (default: stdout, or the notebook's display).
            top: Keep the ``top`` largest rows, largest first, and one row for the others.
            by: ``"entry"`` (a row each), ``"module"`` (a row per module) or ``"total"``.
            depth: With ``by="module"``: group by the first ``depth`` parts of the names.

        Returns:
            The ``Summary``: the table as a string.

        Raises:
            ValueError: An unknown ``tablefmt`` or ``by``, or a ``top``/``depth`` below 1.
        """
        check_tablefmt(tablefmt)
        check_view(top, by, depth)
        extra, loss_value = table_extra(loss)
        lasts = self._readout.lasts()  # the values and the steps they were computed at, at once
        rows, total, extra_values = self._rows(scope, extra, lasts)
        if extra_values:
            loss_value = extra_values[0]
        return render(
            rows,
            total,
            loss_value,
            steps_of(lasts),
            tablefmt=tablefmt,
            file=file,
            top=top,
            by=by,
            depth=depth,
        )


def _restore_collection(uid: str, was_default: bool) -> Collection:
    """Unpickling a collection: the same one while it is alive in this process, else the
    default collection (with one warning when the original was a custom one)."""
    found = COLLECTIONS.by_uid.get(uid)
    if found is not None:
        return found
    if not was_default and not COLLECTIONS.warned_lost:
        COLLECTIONS.warned_lost = True
        warnings.warn(
            "an unpickled (or torch.load-ed) layer belonged to a regcollect.Collection that "
            "does not exist in this process; its regularizers are registered in the default "
            "collection instead. Pass collection=... when you rebuild, or move them with "
            "Collection.remove() and rc.load_plan().",
            RegcollectWarning,
            stacklevel=2,
        )
    return default_collection()


def default_collection() -> Collection:
    """The default collection, used when no ``collection=`` is given: made on first use, not
    at import."""
    default: Collection | None = COLLECTIONS.default
    if default is None:
        with _DEFAULT_LOCK:
            if COLLECTIONS.default is None:
                COLLECTIONS.default = Collection()
            default = COLLECTIONS.default
    return default


_DEFAULT_LOCK = _locks.Lock()


# The public path (regcollect.Collection), which pickles record, not this private module's.
Collection.__module__ = Collection._unpickle.__module__ = "regcollect"
