"""Attaching regularizers to any module, without subclassing it."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch

from . import _naming
from ._checks import check_module, keywords_checked, shown, warn_user
from ._collection.collection import Collection
from ._collection.handle import Handle
from ._context import active_collection, current_prefix
from ._distributed.seam import holds
from ._penalties.base import RegularizerArg
from ._penalties.l2sp import check_reference_shape, reference_name
from ._policy import is_norm, no_weight_decay, rule, walk_parameters
from .regularizers import L2SP, Regularizer
from .regularizers import get as get_regularizer

__all__ = ["add_activity_regularizer", "add_regularizer", "is_norm", "regularize"]


def _required(regularizer: object) -> Regularizer:
    reg = get_regularizer(regularizer)
    if reg is None:
        raise ValueError(
            "regularizer must not be None: pass a Regularizer, a string, a dict or a callable"
        )
    return reg


def resolve_parameter(module: torch.nn.Module, param_name: object) -> tuple[torch.nn.Module, str]:
    """``(owning submodule, local name)`` for a dotted parameter name (also one FSDP1 moved
    into a flat parameter, ``use_orig_params=False``), or a clear error."""
    if not isinstance(param_name, str) or not param_name:
        name = next((n for n, p in module.named_parameters() if p is param_name), None)
        hint = f"; the model names that tensor {name!r}" if name is not None else ""
        got = type(param_name).__name__ if isinstance(param_name, torch.Tensor) else ""
        raise TypeError(
            f"param_name must be a non-empty string, got {got or shown(param_name)}{hint}"
        )
    path, _, local = param_name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        owner = None
    # A parameter an engine took out of its module (FSDP1's flat parameters) is found there.
    if owner is None or (owner._parameters.get(local) is None and not holds(owner, local)):
        # Listed only on error: building the list on every call made registering each of a
        # module's N parameters cost O(N^2).
        available = [name for name, _ in module.named_parameters()]
        raise ValueError(
            f"{type(module).__name__} has no parameter {param_name!r}; "
            f"its parameters are {available}"
        )
    return owner, local


@keywords_checked
def add_regularizer(
    module: torch.nn.Module,
    param_name: str,
    regularizer: RegularizerArg,
    *,
    collection: Collection | None = None,
) -> Handle:
    """Penalise ``module``'s parameter ``param_name`` (dotted names reach into submodules).

    Registering again on the same parameter (or a parameter tied to it) replaces the previous
    regularizer in that collection.

    Args:
        module: The module (or model) holding the parameter.
        param_name: The parameter's name, dotted through submodules (``"encoder.0.weight"``).
        regularizer: The penalty: anything ``rc.regularizers.get`` accepts except None
            (a ``Regularizer``, a name, a config dict or a callable).
        collection: The collection to register in (default: the active one).

    Returns:
        A ``Handle``; ``.remove()`` undoes this call, restoring what it replaced.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: No parameter ``param_name``, or a regularizer ``get`` rejects or None.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> handle = rc.add_regularizer(model, "0.weight", rc.l2(0.01))
        >>> handle.remove()
    """
    owner, local = resolve_parameter(check_module(module), param_name)
    reg = _required(regularizer)
    coll = active_collection(collection)
    _naming.record_tree(module)
    return coll.register(owner, local, reg, prefix=current_prefix())


@keywords_checked
def add_activity_regularizer(
    module: torch.nn.Module, regularizer: RegularizerArg, *, collection: Collection | None = None
) -> Handle:
    """Penalise ``module``'s output: ``regularizer(output) / batch_size`` on every forward pass
    made with gradients enabled, counted once by the next ``loss()``.

    Args:
        module: The module whose output (the first tensor of a tuple) is penalised.
        regularizer: The penalty: anything ``rc.regularizers.get`` accepts except None
            (a ``Regularizer``, a name, a config dict or a callable).
        collection: The collection to register in (default: the active one).

    Returns:
        A ``Handle``; ``.remove()`` removes the forward hook and the entry.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: A regularizer ``get`` rejects, or None.

    Examples:
        >>> import torch, regcollect as rc
        >>> layer = torch.nn.Linear(2, 2)
        >>> handle = rc.add_activity_regularizer(layer, rc.l1(0.5))
        >>> out = layer(torch.ones(4, 2))
        >>> torch.allclose(rc.loss(layer), 0.5 * out.abs().sum() / 4)   # per example, as Keras
        True
        >>> handle.remove()
    """
    check_module(module)
    reg = _required(regularizer)
    coll = active_collection(collection)
    _naming.record_tree(module)
    return coll.register_activity(module, reg, prefix=current_prefix())


def _patterns(value: object, argument: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{argument} must be a list of glob patterns such as ['encoder.*.weight'], "
            f"got {value!r} of type {type(value).__name__}"
        )
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument} must contain strings, got {pattern!r} in {value!r}")
    return list(value)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _lookup(state_dict: Mapping[str, torch.Tensor], name: str, logical: str) -> torch.Tensor | None:
    """The tensor for a parameter in a state dict, under its name, its logical name (a
    parametrized weight), or either one behind wrapper prefixes (a state dict saved from a
    DDP or compiled model)."""
    for key in (name, logical):
        if key in state_dict:
            return state_dict[key]
    for key, value in state_dict.items():
        stripped = key
        while stripped.startswith(_naming.WRAPPER_PREFIXES):
            stripped = stripped.partition(".")[2]
        if stripped in (name, logical):
            return value
    return None


@keywords_checked
def regularize(
    model: torch.nn.Module,
    *,
    kernel: RegularizerArg = None,
    bias: RegularizerArg = None,
    norm: RegularizerArg = None,
    embeddings: RegularizerArg = None,
    activity: RegularizerArg = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    collection: Collection | None = None,
) -> Handle:
    """Regularize an existing (e.g. pretrained) model in one call.

    - ``kernel``: parameters of rank >= 2 outside normalisation and embedding layers;
    - ``bias``: biases outside normalisation layers;
    - ``norm``: every parameter of normalisation layers (BatchNorm*, LayerNorm, GroupNorm,
      InstanceNorm*, RMSNorm and custom classes named ``*Norm*`` holding only vectors);
    - ``embeddings``: tables of ``Embedding``/``EmbeddingBag``;
    - ``activity``: output penalty on the model, or on the modules whose names match ``include``.

    ``include``/``exclude`` are lists of glob patterns over qualified parameter names
    (``"encoder.*.weight"``); wrapper prefixes (``module.``, ``_orig_mod.``,
    ``_fsdp_wrapped_module.``) never appear in them. Names listed by ``model.no_weight_decay()``
    are skipped; they may be glob patterns, as timm reads them (``"pos_embed.*"``). Calling
    again replaces (never double counts); ``.remove()`` on the returned
    handle undoes exactly this call.

    ``kernel`` alone is timm's decay set. Hugging Face's ``Trainer`` also decays embedding
    tables and some 0-D/1-D parameters: ``kernel=reg, embeddings=reg`` is its set on BERT and
    GPT-2; ``regcollect.integrations.transformers.regularize`` is its set on any model.

    Args:
        model: The model.
        kernel: Penalty on weights of rank >= 2 outside normalisation and embedding layers.
        bias: Penalty on biases outside normalisation layers.
        norm: Penalty on the parameters of normalisation layers.
        embeddings: Penalty on embedding tables.
        activity: Penalty on the output of the model, or of the modules ``include`` names.
        include: Glob patterns over parameter (or, for ``activity``, module) names: only
            those are regularized.
        exclude: Glob patterns over parameter names to leave out.
        collection: The collection to register in (default: the active one).

    Returns:
        One ``Handle`` for everything this call registered.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``include``/``exclude`` are not lists
            of strings.
        ValueError: A regularizer ``get`` rejects; an ``L2SP`` reference state dict that
            misses parameters or has one of another shape; lazy parameters (``LazyLinear``)
            not materialized by a first forward pass.

    Examples:
        >>> import torch, regcollect as rc
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> handle = rc.regularize(model, kernel=rc.l2(1e-4))
        >>> [e.name for e in handle.entries]
        ['0.weight']
    """
    check_module(model)
    regs = {
        "kernel": get_regularizer(kernel),
        "bias": get_regularizer(bias),
        "norm": get_regularizer(norm),
        "embeddings": get_regularizer(embeddings),
    }
    activity_reg = get_regularizer(activity)
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    coll = active_collection(collection)
    _naming.record_tree(model)
    skip = no_weight_decay(model)
    prefix = current_prefix()
    targets: list[tuple[torch.nn.Module, str, Regularizer]] = []
    missing: list[str] = []
    uninitialized: list[str] = []
    norms: dict[int, bool] = {}  # per layer, not per parameter
    for name, logical, owner, local, layer in walk_parameters(model):
        names = (name, logical)
        if _any_matches(names, skip) or not _selected(names, include_p, exclude_p):
            continue
        param = owner._parameters.get(local)  # None: in an FSDP1 flat parameter
        if isinstance(param, torch.nn.parameter.UninitializedParameter):
            uninitialized.append(name)
            continue
        if id(layer) not in norms:
            norms[id(layer)] = is_norm(layer)
        kind = rule(logical, owner, local, param, layer, norms[id(layer)])
        reg = regs[kind] if kind is not None else None
        if isinstance(reg, L2SP) and isinstance(reg.reference, Mapping):
            reg = _l2sp_from(reg, name, logical, param)
            if reg is None:
                missing.append(name)
                continue
        if reg is not None:
            targets.append((owner, local, reg))
    _refuse(uninitialized, missing)
    handles = [coll.register(owner, local, reg, prefix=prefix) for owner, local, reg in targets]
    if activity_reg is not None:
        outputs = [model]
        if include_p is not None:
            outputs = [m for n, m in _naming.named_modules(model) if n and _matches(n, include_p)]
        for module in outputs:
            handles.append(coll.register_activity(module, activity_reg, prefix=prefix))
    if not handles:
        _warn_nothing(model, [*regs.values(), activity_reg], include, exclude)
    return Handle.join(handles)


def _warn_nothing(
    model: torch.nn.Module, regs: list[Regularizer | None], include: object, exclude: object
) -> None:
    """A ``regularize`` call that registered nothing is a silent no-op (a mistyped pattern,
    a model without weights): say why, at the user's line."""
    kind = type(model).__name__
    names = [name for name, *_ in walk_parameters(model)]
    if all(reg is None for reg in regs):
        reason = "no regularizer was given (kernel=, bias=, norm=, embeddings= or activity=)"
    elif not names:
        reason = f"{kind} has no parameters"
    else:
        filters = ", ".join(
            f"{arg}={value!r}" for arg, value in (("include", include), ("exclude", exclude))
            if value is not None
        )  # fmt: skip
        selected = f"the parameters {filters} selects" if filters else "its parameters"
        reason = (
            f"none of {selected} is of a kind the regularizers given cover (kernel: weights "
            "of rank >= 2; bias: biases; norm: normalisation layers; embeddings: tables), "
            "or no_weight_decay() lists them"
        )
        reason += f"; its parameters are named like {shown(names[:3])}"
    warn_user(f"rc.regularize({kind}) registered nothing: {reason}.")


def _any_matches(names: tuple[str, str], patterns: list[str]) -> bool:
    return any(_matches(n, patterns) for n in names)


def _selected(names: tuple[str, str], include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a parameter, by its name or its logical name, passes ``include``/``exclude``."""
    if include is not None and not _any_matches(names, include):
        return False
    return exclude is None or not _any_matches(names, exclude)


def _l2sp_from(reg: L2SP, name: str, logical: str, param: torch.Tensor | None) -> L2SP | None:
    """An ``L2SP`` whose reference is a state dict, bound to the parameter's tensor in it:
    a fine-tuning checkpoint keeps the original reference beside the weights it moved (that
    one first); a pretrained state dict has the parameter itself. None: no tensor for it."""
    assert isinstance(reg.reference, Mapping)
    reference = _lookup(reg.reference, reference_name(name), reference_name(logical))
    if reference is None:
        reference = _lookup(reg.reference, name, logical)
    if reference is None:
        return None
    if param is not None:
        check_reference_shape(reference, param, name)  # named as in the model
    return L2SP(reg.l2, reference=reference)


def _refuse(uninitialized: list[str], missing: list[str]) -> None:
    """Before anything is registered: lazy parameters, L2-SP references not found."""
    if uninitialized:
        raise ValueError(
            f"model has lazy parameters not materialized yet: {uninitialized}; their shapes "
            "(and so which rule covers them) are unknown until the first forward pass. Run "
            "one forward pass (a dummy batch) before rc.regularize"
        )
    if missing:
        raise ValueError(
            f"the L2SP reference state dict has no tensor for {missing}: parameters without "
            "a pretrained value (a new head) need a regularizer of their own; leave them "
            "out with exclude=[...] and give them e.g. rc.l2(...) through include=[...]"
        )
