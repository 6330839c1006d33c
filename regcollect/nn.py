"""Drop-in ``torch.nn`` layers that take Keras-style regularizer arguments.

Each class subclasses its ``torch.nn`` twin with the same constructor arguments and the same
``state_dict`` keys, plus keyword-only regularizer arguments (anything
``regcollect.regularizers.get`` accepts) and ``collection=``. One mixin,
``RegularizedLayer``, does the work for every class; a class only declares which
parameters each argument covers.

Examples:
    >>> import torch, regcollect as rc
    >>> layer = rc.nn.Linear(4, 2, kernel_regularizer=rc.l2(1e-4), bias_regularizer="l1")
    >>> isinstance(layer, torch.nn.Linear), layer.kernel_regularizer
    (True, L2(l2=0.0001))
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

import torch

from ._checks import suggest_keyword, warn_user
from ._collection.collection import Collection
from ._collection.entries import parametrized_tensors
from ._context import active_collection, current_prefix, scope_default
from ._naming import drop_inert_hooks, glob_of
from ._naming import inert_hook_factory as _inert_hook  # noqa: F401 (pickles)
from .regularizers import Regularizer
from .regularizers import get as get_regularizer

__all__ = [
    "RegularizedLayer",
    "Linear",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "EmbeddingBag",
    "RNN",
    "LSTM",
    "GRU",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "GroupNorm",
]

_UNSET: Any = object()
_ACTIVITY = "activity_regularizer"
_SNAPSHOT = "_rc_snapshot"


def _argument_property(argument: str) -> property:
    """``layer.<argument>``: reads what the layer's collection counts now, and registers what
    is assigned (None removes). The collection is the only place the regularizer is kept."""

    def get(self: RegularizedLayer) -> Regularizer | None:
        return self._rc_read(argument)

    def set_(self: RegularizedLayer, value: object) -> None:
        self._rc_set(argument, get_regularizer(value))

    return property(get, set_, doc=f"The regularizer on this layer's {argument} targets.")


class RegularizedLayer(torch.nn.Module):
    """Mixin adding regularizer arguments to a ``torch.nn`` layer.

    Subclasses set ``_rc_targets``: for each argument, a regular expression selecting the
    parameter names it covers (``{"kernel_regularizer": "weight"}``). Every layer also takes
    ``activity_regularizer`` (penalising its output) and ``collection``. The arguments are
    readable and assignable attributes that read through to the collection: what
    ``rc.add_regularizer`` or ``rc.regularize`` registers on the layer shows there too.

    Args:
        collection: The collection to register in (default: the active one). The
            regularizer arguments and the twin's own arguments come through ``**kwargs``.

    Examples:
        >>> import torch, regcollect as rc
        >>> class PReLU(rc.nn.RegularizedLayer, torch.nn.PReLU):
        ...     _rc_targets = {"alpha_regularizer": "weight"}
        >>> act = PReLU(alpha_regularizer=rc.l2(0.1))
        >>> act.alpha_regularizer
        L2(l2=0.1)
    """

    _rc_targets: ClassVar[dict[str, str]] = {}
    # Constructor arguments of the docstring's example (``"4, 2"`` for Linear).
    _rc_example: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for argument in (*cls._rc_targets, _ACTIVITY):
            if not isinstance(cls.__dict__.get(argument), property):
                setattr(cls, argument, _argument_property(argument))
        base = next((b for b in cls.__mro__[1:] if not issubclass(b, RegularizedLayer)), None)
        if base is None or base is torch.nn.Module:
            return
        if "_rc_example" in cls.__dict__:  # regcollect's own layers, not users' subclasses
            cls.__doc__ = _layer_doc(cls, base)
        try:
            params = list(inspect.signature(base.__init__).parameters.values())
        except (TypeError, ValueError):
            return
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
            for name, kind in [
                *((n, "Regularizer | str | dict | Callable | None") for n in cls._rc_arguments()),
                ("collection", "Collection | None"),
            ]
        ]
        positional = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
        keyword = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            positional[1:] + extra + keyword
        )

    def __init__(self, *args: Any, collection: Collection | None = None, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name, _UNSET) for name in self._rc_arguments()}
        regs: dict[str, Regularizer | None] = {
            name: scope_default(name) if value is _UNSET else get_regularizer(value)
            for name, value in given.items()
        }
        coll = active_collection(collection)
        try:
            super().__init__(*args, **kwargs)
        except TypeError as exc:  # a misspelled keyword: suggest the one meant
            accepted = [*self._rc_arguments(), *inspect.signature(super().__init__).parameters]
            suggest_keyword(exc, type(self).__name__, kwargs, accepted, self._rc_targets)
            raise
        self._rc_collection = coll
        self._rc_prefix = current_prefix()
        for name, reg in regs.items():  # a scope's default is for the layers it applies to
            if reg is not None:
                (self._rc_write if given[name] is _UNSET else self._rc_set)(name, reg)

    def _rc_set(self, argument: str, reg: Regularizer | None) -> None:
        """What the user set: ``_rc_write``, with a warning when it covers nothing."""
        if not self._rc_write(argument, reg) and reg is not None:
            warn_user(
                f"{type(self).__name__}({argument}={reg!r}) regularizes nothing: the layer has "
                f"no parameter named {glob_of(self._rc_targets[argument])} (made without it?)"
            )

    @classmethod
    def _rc_arguments(cls) -> tuple[str, ...]:
        return (*cls._rc_targets, _ACTIVITY)

    def _rc_params(self, argument: str) -> list[tuple[torch.nn.Module, str | None]]:
        """``(module, parameter)`` pairs ``argument`` covers (``(self, None)``: the output).

        A parameter parametrized since (``weight_norm``, ``spectral_norm``) is covered where
        it lives now, as the collection follows it.
        """
        if argument == _ACTIVITY:
            return [(self, None)]
        pattern = self._rc_targets[argument]
        lists = self._modules.get("parametrizations")
        names = [*self._parameters, *(lists._modules if lists is not None else ())]
        names += [n[: -len(s)] for n in self._parameters for s in ("_orig", "_g") if n.endswith(s)]
        out: list[tuple[torch.nn.Module, str | None]] = []
        for name in dict.fromkeys(names):
            if not re.fullmatch(pattern, name):
                continue
            if self._parameters.get(name) is not None:
                out.append((self, name))
            else:
                out.extend(parametrized_tensors(self, name))
        return out

    def _rc_read(self, argument: str) -> Regularizer | None:
        coll: Collection | None = self.__dict__.get("_rc_collection")
        found = (coll.find(m, n) for m, n in self._rc_params(argument)) if coll is not None else ()
        entry = next((e for e in found if e is not None), None)
        return None if entry is None else entry.regularizer  # type: ignore[no-any-return]

    def _rc_write(self, argument: str, reg: Regularizer | None) -> bool:
        """Register ``reg`` (None: unregister) on what ``argument`` covers; False if nothing."""
        coll: Collection = self._rc_collection
        covered = self._rc_params(argument)
        for module, name in covered:
            if reg is not None:
                self._rc_add(module, name, reg)
            elif (entry := coll.find(module, name)) is not None:
                coll.unregister(entry)
        return bool(covered)

    def _rc_add(self, module: torch.nn.Module, param: str | None, reg: Regularizer) -> None:
        coll: Collection = self._rc_collection
        if param is None:
            coll.register_activity(module, reg, prefix=self._rc_prefix)
        else:
            coll.register(module, param, reg, prefix=self._rc_prefix)

    def __getstate__(self) -> dict[str, Any]:
        # A copy registers what the original's collection counts on it now (nothing after
        # Collection.remove(layer)), not the arguments it was built with.
        state = dict(self.__dict__)
        coll: Collection | None = state.get("_rc_collection")
        if coll is not None:
            names: list[str | None] = [*self._parameters, None]
            found = {n: coll.find(self, n) for n in names}
            state[_SNAPSHOT] = {n: e.regularizer for n, e in found.items() if e is not None}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        snapshot = state.pop(_SNAPSHOT, {})
        super().__setstate__(state)
        # Unpickled or deep-copied: activity hooks came back inert; register this copy afresh.
        drop_inert_hooks(self)
        if "_rc_collection" in self.__dict__:
            for name, reg in snapshot.items():
                self._rc_add(self, name, reg)

    def extra_repr(self) -> str:
        """The twin's ``extra_repr`` plus the regularizers set on the layer.

        Returns:
            ``"in_features=4, ..., kernel_regularizer=L2(l2=0.0001)"``.
        """
        regs = [
            f"{name}={getattr(self, name)!r}"
            for name in self._rc_arguments()
            if getattr(self, name, None) is not None
        ]
        return ", ".join([s for s in (super().extra_repr(), *regs) if s])


def _layer_doc(cls: type[RegularizedLayer], base: type) -> str:
    """The docstring of a layer class: its summary, then Google-style sections built from
    its ``_rc_targets``, so every layer documents its arguments the same way."""
    twin = f"torch.nn.{base.__name__}"
    summary = inspect.cleandoc(cls.__doc__ or f"``{twin}`` with regularizer arguments.")
    accepted = 'a ``Regularizer``, a name (``"l2"``), a config dict or a callable'
    args = [
        f"{argument}: Penalty on ``{glob_of(pattern)}``: {accepted}. None (the default) "
        "registers nothing, unless an enclosing ``rc.scope`` gives a default."
        for argument, pattern in cls._rc_targets.items()
    ]
    args += [
        f"{_ACTIVITY}: Penalty on the layer's output (the first tensor of a tuple), divided "
        "by the batch size as in Keras, recorded on forward passes with gradients enabled.",
        "collection: The ``rc.Collection`` to register in; default: the active one.",
    ]
    first = next(iter(cls._rc_targets))
    lines = [
        summary,
        "",
        f"The arguments and ``state_dict`` keys of ``{twin}``, plus the keyword-only",
        "arguments below; the regularizer arguments are also readable and assignable",
        "attributes.",
        "",
        "Args:",
        *(f"    {a}" for a in args),
        "",
        "Raises:",
        "    TypeError: A regularizer argument of a type ``rc.regularizers.get`` does not take.",
        "    ValueError: An unknown regularizer name or a negative coefficient.",
        "",
        "Examples:",
        "    >>> import regcollect as rc",
        f"    >>> layer = rc.nn.{cls.__name__}({cls._rc_example}, {first}=rc.l2(1e-4))",
        f"    >>> layer.{first}",
        "    L2(l2=0.0001)",
    ]
    return "\n".join(lines)


_KERNEL_BIAS = {"kernel_regularizer": "weight", "bias_regularizer": "bias"}
_EMBEDDINGS = {"embeddings_regularizer": "weight"}
_RECURRENT = {
    "kernel_regularizer": r"weight_(ih|hr)_l\d+(_reverse)?",
    "recurrent_regularizer": r"weight_hh_l\d+(_reverse)?",
    "bias_regularizer": r"bias_(ih|hh)_l\d+(_reverse)?",
}
_NORM = {"gamma_regularizer": "weight", "beta_regularizer": "bias"}


class Linear(RegularizedLayer, torch.nn.Linear):
    """``torch.nn.Linear`` with ``kernel_regularizer`` (weight), ``bias_regularizer`` (bias)."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "4, 2"


class Bilinear(RegularizedLayer, torch.nn.Bilinear):
    """``torch.nn.Bilinear`` with ``kernel_regularizer`` (weight), ``bias_regularizer`` (bias)."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "3, 4, 2"


class Conv1d(RegularizedLayer, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` with ``kernel_regularizer`` (weight), ``bias_regularizer`` (bias)."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "3, 8, 3"


class Conv2d(RegularizedLayer, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` with ``kernel_regularizer`` (weight), ``bias_regularizer`` (bias)."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "3, 8, 3"


class Conv3d(RegularizedLayer, torch.nn.Conv3d):
    """``torch.nn.Conv3d`` with ``kernel_regularizer`` (weight), ``bias_regularizer`` (bias)."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "3, 8, 3"


class ConvTranspose1d(RegularizedLayer, torch.nn.ConvTranspose1d):
    """``torch.nn.ConvTranspose1d`` with ``kernel_regularizer``, ``bias_regularizer``."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "8, 3, 3"


class ConvTranspose2d(RegularizedLayer, torch.nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` with ``kernel_regularizer``, ``bias_regularizer``."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "8, 3, 3"


class ConvTranspose3d(RegularizedLayer, torch.nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` with ``kernel_regularizer``, ``bias_regularizer``."""

    _rc_targets = _KERNEL_BIAS
    _rc_example = "8, 3, 3"


class Embedding(RegularizedLayer, torch.nn.Embedding):
    """``torch.nn.Embedding`` with ``embeddings_regularizer`` (weight)."""

    _rc_targets = _EMBEDDINGS
    _rc_example = "10, 4"


class EmbeddingBag(RegularizedLayer, torch.nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` with ``embeddings_regularizer`` (weight)."""

    _rc_targets = _EMBEDDINGS
    _rc_example = "10, 4"


class RNN(RegularizedLayer, torch.nn.RNN):
    """``torch.nn.RNN`` with ``kernel_regularizer`` (``weight_ih_l*``), ``recurrent_regularizer``
    (``weight_hh_l*``) and ``bias_regularizer`` (``bias_*``)."""

    _rc_targets = _RECURRENT
    _rc_example = "4, 8"


class LSTM(RegularizedLayer, torch.nn.LSTM):
    """``torch.nn.LSTM`` with ``kernel_regularizer`` (``weight_ih_l*`` and projections
    ``weight_hr_l*``), ``recurrent_regularizer`` (``weight_hh_l*``), ``bias_regularizer``."""

    _rc_targets = _RECURRENT
    _rc_example = "4, 8"


class GRU(RegularizedLayer, torch.nn.GRU):
    """``torch.nn.GRU`` with ``kernel_regularizer`` (``weight_ih_l*``), ``recurrent_regularizer``
    (``weight_hh_l*``) and ``bias_regularizer`` (``bias_*``)."""

    _rc_targets = _RECURRENT
    _rc_example = "4, 8"


class BatchNorm1d(RegularizedLayer, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with ``gamma_regularizer`` (weight), ``beta_regularizer`` (bias)."""

    _rc_targets = _NORM
    _rc_example = "8"


class BatchNorm2d(RegularizedLayer, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with ``gamma_regularizer`` (weight), ``beta_regularizer`` (bias)."""

    _rc_targets = _NORM
    _rc_example = "8"


class BatchNorm3d(RegularizedLayer, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with ``gamma_regularizer`` (weight), ``beta_regularizer`` (bias)."""

    _rc_targets = _NORM
    _rc_example = "8"


class LayerNorm(RegularizedLayer, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with ``gamma_regularizer`` (weight), ``beta_regularizer`` (bias)."""

    _rc_targets = _NORM
    _rc_example = "8"


class GroupNorm(RegularizedLayer, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with ``gamma_regularizer`` (weight), ``beta_regularizer`` (bias)."""

    _rc_targets = _NORM
    _rc_example = "2, 8"


def __dir__() -> list[str]:
    """The public API (``__all__``): what tab completion offers, not this module's imports."""
    return sorted(__all__)
