"""Entries: one regularizer on one parameter, module output or bare tensor.

An entry finds its tensor when asked (``module._parameters[name]`` now), so replaced
parameters, ``.to()`` and sharding keep working, and it holds what it regularizes weakly: a
deleted model stops counting and nothing leaks. Entries do not change once made (their
collection only caches their resolved name on them); what a registration replaced, for its
handle to restore, is kept in the handle's undo record (``regcollect._collection.handle``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .. import _naming
from .._distributed.seam import real_shape
from ..regularizers import Regularizer

__all__ = [
    "ACTIVITY",
    "TENSOR",
    "WEIGHT",
    "Entry",
    "current_tensors",
    "parametrized_tensors",
    "unique_names",
]

WEIGHT, ACTIVITY, TENSOR = "weight", "activity", "tensor"


def _dead_ref() -> None:
    """Stands in for the weak reference of an entry that regularizes no tensor."""
    return None


class Entry:
    """One regularizer on one parameter (``kind == "weight"``), module output (``"activity"``)
    or bare tensor (``"tensor"``). Read-only: re-register to change it.

    Entries are made by registration (layer arguments, ``rc.add_regularizer``,
    ``rc.regularize``, TF1's ``apply_regularization``), never by hand; handles and
    ``Collection.entries`` list them.

    Args:
        kind: ``"weight"``, ``"activity"`` or ``"tensor"``.
        regularizer: The regularizer applied.
        module_ref: A weak reference to the module (weight and activity entries).
        param: The parameter's name in that module (weight entries).
        tensor_ref: A weak reference to the tensor (tensor entries).
        prefix: The scope prefix of its name (``"decoder/"``).
        explicit_name: A name given at registration instead of the module path.
        key: Where it is registered in its collection (its module and parameter, or its
            tensor): a later registration at the same key replaces it.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> handle = rc.add_regularizer(model, "0.weight", rc.l2(0.01))
        >>> entry, = handle.entries
        >>> entry.name, entry.kind, entry.regularizer, entry.shape
        ('0.weight', 'weight', L2(l2=0.01), (2, 2))
        >>> handle.remove()
    """

    __slots__ = (
        "__weakref__",
        "_explicit_name",
        "_key",
        "_kind",
        "_module_ref",
        "_name",
        "_param",
        "_prefix",
        "_regularizer",
        "_tensor_ref",
    )

    def __init__(
        self,
        kind: str,
        regularizer: Regularizer,
        *,
        module_ref: weakref.ref[torch.nn.Module] | None = None,
        param: str | None = None,
        tensor_ref: weakref.ref[torch.Tensor] | None = None,
        prefix: str = "",
        explicit_name: str | None = None,
        key: tuple[Any, ...] = (),
    ) -> None:
        self._kind = kind
        self._regularizer = regularizer
        self._module_ref = module_ref
        self._param = param
        self._tensor_ref = tensor_ref
        self._prefix = prefix
        self._explicit_name = explicit_name
        self._key = key
        self._name = ""  # the registry's cache of its unique name

    kind = property(lambda self: self._kind, doc='"weight", "activity" or "tensor".')
    regularizer = property(lambda self: self._regularizer, doc="The regularizer applied.")
    param = property(lambda self: self._param, doc="The parameter's name in its module.")
    prefix = property(lambda self: self._prefix, doc='The scope prefix, e.g. "decoder/".')
    key = property(lambda self: self._key, doc="Where it is registered in its collection.")

    @property
    def name(self) -> str:
        """The entry's unique name in its collection (``"encoder.0.weight"``)."""
        return self._name or self.base_name()[0]

    @property
    def module(self) -> torch.nn.Module | None:
        """The module holding the parameter (or producing the output); None once deleted."""
        return None if self._module_ref is None else self._module_ref()

    @property
    def alive(self) -> bool:
        ref = self._module_ref if self._module_ref is not None else self._tensor_ref
        return ref is not None and ref() is not None

    @property
    def locator(self) -> tuple[Any, str | None]:
        """``(module ref, parameter name)`` for weights, ``(tensor ref, None)`` otherwise."""
        if self._kind == WEIGHT:
            return (self._module_ref, self._param)
        return (self._tensor_ref if self._kind == TENSOR else _dead_ref, None)

    def resolve(self) -> torch.Tensor | None:
        """The tensor this entry regularizes now.

        Returns:
            The parameter or tensor (where it lives now, also after parametrization), or
            None for activity entries and dead ones.
        """
        return current_tensors([self.locator])[0]

    def tensors(self) -> list[torch.Tensor]:
        """What this entry's penalty depends on.

        Returns:
            Its tensor, or an activity entry's module's parameters (what an optimizer must
            update for a coefficient schedule to advance); empty once dead.
        """
        if self._kind == ACTIVITY:
            module = self.module
            return [] if module is None else list(module.parameters())
        tensor = self.resolve()
        return [] if tensor is None else [tensor]

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The regularized tensor's (global) shape; None for activity and dead entries."""
        tensor = self.resolve()
        module = self._module_ref() if self._module_ref is not None else None
        if module is not None and self._param is not None:
            # As the model made it, not as an engine holds it (a flat part, nothing).
            full = real_shape(module, self._param, tensor)
            return None if full is None else tuple(full)
        return None if tensor is None else tuple(tensor.shape)

    def base_name(self) -> tuple[str, torch.nn.Module | None]:
        """The entry's name before de-duplication, and where it comes from.

        Returns:
            ``(name, outermost model holding it or None)``.
        """
        if self._explicit_name is not None:
            return self._prefix + self._explicit_name, None
        module = self.module
        if module is None:
            return self._prefix + "<deleted>", None
        root, path = _naming.path_to_root(module)
        if self._kind == ACTIVITY:
            return self._prefix + (path or _naming.auto_name(module)) + ":activity", root
        if not path and module._modules:
            # A parameter the model itself holds (a ViT's class_token): its own name, as in
            # named_parameters(); a lone layer keeps a Keras-style name ("linear.weight").
            return self._prefix + f"{self._param}", root
        return self._prefix + f"{path or _naming.auto_name(module)}.{self._param}", root

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self._regularizer!r})"


def tied_name(message_names: tuple[str, str], regularizers: tuple[Regularizer, Regularizer]) -> str:
    """The error for one tensor (tied weights) given two different regularizers."""
    (a, b), (ra, rb) = message_names, regularizers
    return (
        f"{a!r} and {b!r} are one tensor (tied weights), and a tensor gets one regularizer: "
        f"{a!r} has {ra!r}, {b!r} has {rb!r}. Give both the same regularizer, or register "
        f"one of them only (rc.regularize(..., exclude=[{b!r}]))."
    )


def _first_paths(root: torch.nn.Module) -> dict[int, str]:
    """``id(tensor) -> name`` of the parameters of ``root``, each named as
    ``root.named_parameters()`` names it: by its first path (a tied weight by the module that
    comes first), wrapper attributes left out."""
    out: dict[int, str] = {}
    for path, module in _naming.named_modules(root):
        for name, p in module._parameters.items():
            if p is not None and id(p) not in out:
                out[id(p)] = f"{path}.{name}" if path else name
    return out


def unique_names(entries: Iterable[Entry]) -> dict[Entry, str]:
    """Names for ``entries``, unique among them, in their order.

    A parameter in a model is named as ``named_parameters()`` names it (a tied weight by its
    first path, ``shared.weight`` rather than ``lm_head.weight``). A name taken by an earlier
    entry of another model is prefixed with that model's automatic name
    (``"sequential_1/0.weight"``); any remaining clash gets ``_1``, ``_2``, ...
    """
    names: dict[Entry, str] = {}
    used: set[str] = set()
    paths: dict[int, dict[int, str]] = {}
    for entry in entries:
        base, root = entry.base_name()
        if entry.kind == WEIGHT and root is not None and root._modules:
            tensor = entry.resolve()
            table = paths.get(id(root))
            if table is None:
                table = paths[id(root)] = _first_paths(root)
            first = table.get(id(tensor)) if tensor is not None else None
            if first is not None and entry._explicit_name is None:
                base = entry.prefix + first
        name = base
        if name in used and root is not None:
            name = entry.prefix + _naming.auto_name(root) + "/" + base[len(entry.prefix) :]
        k = 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[entry] = name
    return names


def current_tensors(locators: list[tuple[Any, str | None]]) -> list[torch.Tensor | None]:
    """The tensors entries point at now: ``module._parameters[name]``, or a tensor's referent."""
    return [
        (m._parameters.get(n) if (m := ref()) is not None else None) if n is not None else ref()
        for ref, n in locators
    ]


# The public path (regcollect.Entry), which pickles and reprs record, not this private module's.
Entry.__module__ = "regcollect"


def parametrized_tensors(module: torch.nn.Module, name: str) -> list[tuple[torch.nn.Module, str]]:
    """Where ``module``'s parameter ``name`` lives once parametrized: ``(owner, parameter)``
    pairs of ``parametrizations.<name>.original*`` (``torch.nn.utils.parametrize``) or of the
    hook-based ``<name>_orig`` (spectral_norm) / ``<name>_g``, ``<name>_v`` (weight_norm)."""
    lists = module._modules.get("parametrizations")
    holder = lists._modules.get(name) if lists is not None else None
    if holder is not None:
        return [(holder, n) for n, p in holder._parameters.items() if p is not None]
    found = [
        n
        for n in (f"{name}_orig", f"{name}_g", f"{name}_v")
        if module._parameters.get(n) is not None
    ]
    return [(module, n) for n in found]
