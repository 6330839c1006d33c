"""Where a module sits: parent links, qualified paths and Keras-style automatic names.

PyTorch modules do not know their parents, yet an entry's name is its path inside the outermost
model that holds it, and that model usually comes into existence after the layer. So we record
every ``parent -> child`` registration with PyTorch's global module-registration hook (weakly:
a record never keeps a module alive) and walk the links upwards when a name is asked for. Links
are checked against ``parent._modules`` when used, so replaced or removed children never resolve
to a stale path.

The hook is installed on first need (``follow_links``: the first module that holds an entry,
or a model handed to regcollect), not at import; the links of the modules that exist by then
are recorded at that moment, in one pass over the live objects, so a model built before is
named from its root as one built after. The tables are in ``regcollect._state``.
"""

from __future__ import annotations

import itertools
import re
import weakref
from typing import Any

import torch

from ._state import MODULE_REGISTRATION, NAMING
from ._torch_compat import calls_under_way, is_compiling

__all__ = [
    "ancestors",
    "drop_inert_hooks",
    "inert_hook",
    "inert_hook_factory",
    "running_modules",
    "auto_name",
    "follow_links",
    "glob_of",
    "holders",
    "is_wrapper",
    "learn_model",
    "named_modules",
    "path_to_root",
    "record_tree",
    "track",
    "version",
]

# Only links that reach a tracked module (one holding an entry, or an ancestor) bump the
# version: building unrelated modules (a new optimizer's helper, a metric, a data-loading
# model) leaves it alone, so cached names and scoped plans stay valid.

# Wrappers hold the real model under one attribute, which never appears in names. They are
# recognised by their type (class name and defining package, so that nothing is imported),
# never by the attribute name alone: a user's submodule may well be called "module".
_WRAPPERS = {
    "module": (("DistributedDataParallel", "DataParallel"), "torch.nn.parallel"),
    "_orig_mod": (("OptimizedModule",), "torch._dynamo"),
    "_fsdp_wrapped_module": (("FullyShardedDataParallel",), "torch.distributed.fsdp"),
    "_checkpoint_wrapped_module": (("CheckpointWrapper",), "torch.distributed.algorithms"),
}
# The prefixes these wrappers put in front of the keys of a state dict saved through them.
WRAPPER_PREFIXES = tuple(f"{attribute}." for attribute in _WRAPPERS)


def version() -> int:
    """Bumped whenever a link that reaches a tracked module changes; caches compare against it."""
    return NAMING.version


def follow_links() -> None:
    """Install the module-registration hook if it is not: links made from now on are
    recorded. Links made before (a model built before regcollect was first used, a copy)
    are learnt when the model is handed to regcollect (``record_tree``), or at the first call
    of a module holding an entry (``track``)."""
    if not MODULE_REGISTRATION.installed:
        MODULE_REGISTRATION.add(_on_module_registration)


def track(module: torch.nn.Module) -> None:
    """Follow ``module`` (it holds an entry) and its ancestors: their links matter to names.
    A module with no known parent is watched until its first call, which tells where it
    sits (``_FindModel``)."""
    follow_links()
    if (
        not is_compiling()
        and _parent_of(module) is None
        and not any(isinstance(h, _FindModel) for h in module._forward_pre_hooks.values())
    ):
        _FindModel(module)
    with NAMING.lock:
        pending, seen = [module], set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if current not in NAMING.tracked:
                NAMING.tracked.add(current)
                NAMING.version += 1
            parents = (r() for r, _ in NAMING.parents.get(current, ()))
            pending.extend(p for p in parents if p is not None)


_CALL = torch.nn.Module._call_impl.__code__


def running_modules() -> list[torch.nn.Module]:
    """The modules whose call is under way in this thread, innermost first (their
    ``Module.__call__`` frames)."""
    return [m for m in calls_under_way(_CALL, "self") if isinstance(m, torch.nn.Module)]


def learn_model(running: list[torch.nn.Module]) -> None:
    """Record the tree of the model the innermost of ``running`` (modules whose calls are
    under way, innermost first) belongs to: the outermost of them, except that a wrapper's
    attribute (DDP's and DeepSpeed's ``module``, torch.compile's ``_orig_mod``) ends the
    model, so its prefix never appears in names. For modules whose links nobody recorded (a
    model built before regcollect was used, a pickled or copied one)."""
    model = running[0] if running else None
    for inner, outer in itertools.pairwise(running):
        name = next((n for n, c in outer._modules.items() if c is inner), None)
        if name is not None and f"{name}." in WRAPPER_PREFIXES:
            break
        model = outer
    if model is not None and model is not running[0]:
        record_tree(model)


class _FindModel:
    """A one-shot forward pre-hook on a module whose parents nobody recorded (built before
    regcollect was used, restored from a pickle): at its first call, the modules running
    around it are its model, whose links are recorded then. Pickled or copied, nothing."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if is_compiling():  # frames are not for dynamo: the next eager call looks
            return
        self.handle.remove()
        if _parent_of(module) is None:  # not put into a model since (the hook would know)
            learn_model(running_modules())

    def __reduce__(self) -> tuple[Any, ...]:
        return (inert_hook_factory, ())


def inert_hook(*args: Any) -> None:
    """What a regcollect hook becomes in a pickled or copied model: nothing."""


def inert_hook_factory() -> Any:
    """What unpickling a regcollect hook gives: the no-op."""
    return inert_hook


# Pickles record this function by its public home (regcollect.nn binds it), not this module.
inert_hook_factory.__module__, inert_hook_factory.__qualname__ = "regcollect.nn", "_inert_hook"


def drop_inert_hooks(module: torch.nn.Module) -> None:
    """Remove the no-ops a pickled or copied module's regcollect hooks became."""
    for hooks, extra in (
        (module._forward_hooks, (module._forward_hooks_with_kwargs,)),
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
    ):
        for key in [k for k, hook in hooks.items() if hook is inert_hook]:
            del hooks[key]
            for table in (*extra, module._forward_hooks_always_called):
                table.pop(key, None)


def _link(parent: torch.nn.Module, name: str, child: torch.nn.Module) -> None:
    with NAMING.lock:
        links = NAMING.parents.get(child)
        if links is None:
            NAMING.parents[child] = [(weakref.ref(parent), name)]
        else:
            links[:] = [
                (r, n) for r, n in links if r() is not None and not (r() is parent and n == name)
            ]
            links.append((weakref.ref(parent), name))
        relevant = child in NAMING.tracked
    if relevant:
        track(parent)
        with NAMING.lock:
            NAMING.version += 1


def _on_module_registration(
    parent: torch.nn.Module, name: str, child: torch.nn.Module | None
) -> None:
    # Called before the assignment: a tracked child being replaced (or set to None) moves.
    old = parent._modules.get(name)
    if old is not None and old is not child and old in NAMING.tracked:
        with NAMING.lock:
            NAMING.version += 1
    if isinstance(child, torch.nn.Module):
        _link(parent, name, child)


def _record_children(parent: torch.nn.Module) -> None:
    # From __dict__: a module being unpickled exists before its attributes do.
    for name, child in parent.__dict__.get("_modules", {}).items():
        if child is not None:
            links = NAMING.parents.get(child)
            if links is None or not any(r() is parent and n == name for r, n in links):
                _link(parent, name, child)


def record_tree(root: torch.nn.Module) -> None:
    """Record the links of a whole model handed to regcollect (all of them: a model changed
    while the hook was out)."""
    follow_links()
    for parent in root.modules():
        _record_children(parent)


def _parent_of(module: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    for ref, name in NAMING.parents.get(module, ()):
        parent = ref()
        if parent is not None and parent._modules.get(name) is module:
            return parent, name
    return None


def is_wrapper(parent: torch.nn.Module, name: str) -> bool:
    """Whether ``parent`` is a wrapper (DDP/DataParallel, torch.compile, FSDP1, activation
    checkpointing) holding the wrapped model as its child ``name``."""
    known = _WRAPPERS.get(name)
    if known is None:
        return False
    names, package = known
    return any(
        cls.__name__ in names and cls.__module__.startswith(package) for cls in type(parent).__mro__
    )


def named_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``model.named_modules()`` with wrapper attributes left out of the paths (each module
    once, first path wins)."""
    out: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()
    pending: list[tuple[str, torch.nn.Module]] = [("", model)]
    while pending:
        path, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((path, module))
        children = []
        for name, child in module._modules.items():
            if child is not None:
                step = "" if is_wrapper(module, name) else name
                children.append((f"{path}.{step}".strip(".") if step else path, child))
        pending.extend(reversed(children))
    return out


def _chain(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``(parent, name of the child in it)`` from ``module`` up to its root, nearest first
    (a cycle of links ends it)."""
    out: list[tuple[torch.nn.Module, str]] = []
    seen = {id(module)}
    current = module
    while (link := _parent_of(current)) is not None:
        current = link[0]
        if id(current) in seen:
            break
        seen.add(id(current))
        out.append(link)
    return out


def holders(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module holding ``module``, through every parent link that holds now (a module
    shared by two models is held by both), nearest first."""
    out: list[torch.nn.Module] = []
    seen = {id(module)}
    frontier = [module]
    while frontier:
        current = frontier.pop(0)
        parents = [
            r()
            for r, name in NAMING.parents.get(current, ())
            if (p := r()) is not None and p._modules.get(name) is current
        ]
        for parent in parents:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                out.append(parent)
                frontier.append(parent)
    return out


def ancestors(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules holding ``module``, nearest first (wrappers included)."""
    return [parent for parent, _ in _chain(module)]


def path_to_root(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """``(outermost model holding module, dotted path of module in it)``; ``""`` for a root."""
    chain = _chain(module)
    parts = [name for parent, name in chain if not is_wrapper(parent, name)]
    return (chain[-1][0] if chain else module), ".".join(reversed(parts))


def _snake(name: str) -> str:
    name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    return re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", name).lower()


def auto_name(module: torch.nn.Module) -> str:
    """Keras-style unique name for ``module``: ``linear``, ``linear_1``, ``linear_2``, ..."""
    with NAMING.lock:
        name = NAMING.auto_names.get(module)
        if name is None:
            prefix = _snake(type(module).__name__)
            uid = next(NAMING.counters[prefix])
            name = prefix if uid == 0 else f"{prefix}_{uid}"
            NAMING.auto_names[module] = name
        return name


def glob_of(pattern: str) -> str:
    """A target pattern as a reader's glob: ``weight_(ih|hr)_l\\d+(_reverse)?`` ->
    ``weight_{ih,hr}_l*``."""
    glob = pattern.replace("(_reverse)?", "").replace(r"\d+", "*")
    return re.sub(r"\(([^)]*)\)", lambda m: "{" + m.group(1).replace("|", ",") + "}", glob)
