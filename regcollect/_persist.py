"""A model's regularization plan as JSON-safe data, and back onto a model by names.

Examples:
    >>> import json, torch, regcollect as rc
    >>> coll = rc.Collection()
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> _ = rc.regularize(model, kernel=rc.l2(1e-4), collection=coll)
    >>> text = json.dumps(rc.export_plan(model, collection=coll))
    >>> fresh, other = torch.nn.Sequential(torch.nn.Linear(3, 2)), rc.Collection()
    >>> handle = rc.load_plan(fresh, json.loads(text), collection=other)
    >>> [(e.name, e.regularizer) for e in other.entries()]
    [('0.weight', L2(l2=0.0001))]

Loading treats the data as untrusted: it never imports a module, never evaluates code and
never looks an attribute up by a name from the file. Regularizers resolve through
``regcollect.regularizers.deserialize`` (registered class names only), modules through the
model's own ``named_modules()``, parameters through each module's ``_parameters``. Anything
else is an error naming the entry, and nothing is registered unless every entry is valid.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _naming
from ._checks import check_module, shown
from ._collection.collection import Collection
from ._collection.entries import ACTIVITY, WEIGHT
from ._collection.handle import Handle
from ._context import active_collection
from ._penalties.kernel import kernel_of
from .regularizers import deserialize, serialize

__all__ = ["export_plan", "load_plan"]

FORMAT, VERSION = "regcollect.plan", 1
_ENTRY_KEYS = {"module", "param", "activity", "scope", "regularizer"}


def _module_paths(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module]]:
    """``id(module) -> (wrapper-free path in model, module)``; a shared module keeps its first."""
    out: dict[int, tuple[str, torch.nn.Module]] = {}
    for path, module in _naming.named_modules(model):
        out.setdefault(id(module), (path, module))
    return out


def export_plan(model: torch.nn.Module, *, collection: Collection | None = None) -> dict[str, Any]:
    """The regularizers on ``model``'s parameters and outputs, as JSON-safe data.

    Each entry records the module's path in ``model`` (wrapper prefixes such as ``module.``
    removed), the parameter name (or ``"activity": true``), the ``scope`` prefix it was made
    in, and the serialized regularizer. Custom (function) regularizers cannot be exported:
    subclass ``regcollect.Regularizer`` and ``regcollect.register`` it.

    Args:
        model: The model whose entries are exported.
        collection: The collection to read (default: the active one).

    Returns:
        ``{"format": ..., "version": ..., "entries": [...]}``, for ``json.dump``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an entry's regularizer cannot be
            serialised.

    Examples:
        >>> import json, torch, regcollect as rc
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1e-4)))
        >>> plan = rc.export_plan(model)
        >>> entry, = plan["entries"]
        >>> entry["module"], entry["param"], entry["regularizer"]
        ('0', 'weight', {'class_name': 'L2', 'config': {'l2': 0.0001}})
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> handle = rc.load_plan(fresh, json.loads(json.dumps(plan)))
        >>> handle.entries[0].regularizer
        L2(l2=0.0001)
    """
    check_module(model)
    coll = active_collection(collection)
    paths = _module_paths(model)
    entries = []
    for entry in coll.entries():
        module = entry.module
        if entry.kind not in (WEIGHT, ACTIVITY) or module is None or id(module) not in paths:
            continue
        try:
            regularizer = serialize(entry.regularizer)
        except (ValueError, NotImplementedError) as exc:
            raise TypeError(f"cannot export entry {entry.name!r}: {exc}") from None
        record: dict[str, Any] = {"module": paths[id(module)][0], "scope": entry.prefix}
        if entry.kind == WEIGHT:
            record["param"] = entry.param
        else:
            record["activity"] = True
        record["regularizer"] = regularizer
        entries.append(record)
    return {"format": FORMAT, "version": VERSION, "entries": entries}


def load_plan(
    model: torch.nn.Module, plan: object, *, collection: Collection | None = None
) -> Handle:
    """Register the regularizers of an ``export_plan`` result on ``model``.

    Entries are matched by module path and parameter name; registering replaces what a
    parameter had, as everywhere in regcollect. All entries are checked before any is
    registered.

    Args:
        model: The model to register on (the same architecture as the exported one).
        plan: What ``export_plan`` returned (after a JSON round trip, for instance).
        collection: The collection to register in (default: the active one).

    Returns:
        A ``Handle`` of what was added.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``plan`` or its entries have the
            wrong types.
        ValueError: Wrong keys, format or version; an entry naming a module or parameter
            the model lacks; a regularizer that does not deserialise.

    Examples:
        >>> import torch, regcollect as rc
        >>> plan = {"format": "regcollect.plan", "version": 1, "entries": [
        ...     {"module": "0", "param": "weight", "scope": "",
        ...      "regularizer": {"class_name": "L1", "config": {"l1": 0.01}}}]}
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> rc.load_plan(model, plan).entries[0].regularizer
        L1(l1=0.01)
    """
    check_module(model)
    coll = active_collection(collection)
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict from export_plan(), got {type(plan).__name__}")
    if set(plan) != {"format", "version", "entries"}:
        raise ValueError(
            'plan must have exactly the keys ["entries", "format", "version"], got '
            f"{shown(sorted(map(str, plan)))}"
        )
    # The version is the integer 1: True == 1 and 1.0 == 1 in Python, but not in the format.
    if plan["format"] != FORMAT or type(plan["version"]) is not int or plan["version"] != VERSION:
        raise ValueError(
            f"plan must be format {FORMAT!r} version {VERSION}, "
            f"got format {shown(plan['format'])} version {shown(plan['version'])}"
        )
    if not isinstance(plan["entries"], list):
        raise TypeError(f"plan['entries'] must be a list, got {type(plan['entries']).__name__}")
    _naming.record_tree(model)
    by_path = {path: module for path, module in _module_paths(model).values()}
    checked = [_check_entry(i, raw, by_path) for i, raw in enumerate(plan["entries"])]
    handles = [
        coll.register_activity(module, reg, prefix=scope)
        if param is None
        else coll.register(module, param, reg, prefix=scope)
        for module, param, scope, reg in checked
    ]
    return Handle.join(handles)


def _check_entry(
    i: int, raw: object, by_path: dict[str, torch.nn.Module]
) -> tuple[torch.nn.Module, str | None, str, Any]:
    where = f"plan['entries'][{i}]"
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a dict, got {type(raw).__name__}")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {shown(sorted(map(str, unknown)))}; allowed: "
            f"{sorted(_ENTRY_KEYS)}"
        )
    path, scope = raw.get("module"), raw.get("scope", "")
    if not isinstance(path, str):
        raise TypeError(f"{where}['module'] must be a string path such as '0', got {shown(path)}")
    if not isinstance(scope, str) or (scope and not scope.endswith("/")):
        raise ValueError(
            f"{where}['scope'] must be '' or a prefix ending in '/', got {shown(scope)}"
        )
    module = by_path.get(path)
    if module is None:
        raise ValueError(
            f"{where}: the model has no module {shown(path)}; its modules are "
            f"{sorted(by_path)[:20]}"
        )
    param, activity = raw.get("param"), raw.get("activity", False)
    if activity is not True and activity is not False:
        raise TypeError(f"{where}['activity'] must be true or false, got {shown(activity)}")
    if (param is None) == (not activity):
        raise ValueError(f"{where} must have either 'param' or 'activity': true, not both")
    if param is not None:
        if not isinstance(param, str) or module._parameters.get(param) is None:
            available = [n for n, p in module._parameters.items() if p is not None]
            raise ValueError(
                f"{where}: module {path!r} has no parameter {shown(param)}; it has {available}"
            )
    try:
        reg = deserialize(raw.get("regularizer"))  # type: ignore[arg-type]
        if param is not None:
            kernel_of(reg).check(reg, module._parameters[param])  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}['regularizer']: {exc}") from None
    return module, param, scope, reg
