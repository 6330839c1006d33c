"""Which parameters ``regularize`` covers: the walk over a model's distinct parameters and
the rule, as timm states it, that sorts each into ``kernel``, ``bias``, ``norm`` or
``embeddings``."""

from __future__ import annotations

import torch

from . import _naming
from ._distributed.seam import held_away, real_shape

__all__ = ["is_norm", "no_weight_decay", "rule", "walk_parameters"]


_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        torch.nn.LayerNorm,
        torch.nn.GroupNorm,
        getattr(torch.nn, "RMSNorm", None),
        torch.nn.LocalResponseNorm,
    )
    if t is not None
)
_EMBEDDING_TYPES = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer: a known class, or a custom one that is clearly a norm (its class
    name says ``Norm`` and it holds only vectors, as ``LlamaRMSNorm`` or ``T5LayerNorm`` do)."""
    if isinstance(module, _NORM_TYPES):
        return True
    if "norm" not in type(module).__name__.lower():
        return False
    return all(p.dim() <= 1 for p in module._parameters.values() if p is not None)


def no_weight_decay(model: torch.nn.Module) -> list[str]:
    """``model.no_weight_decay()``: names or glob patterns, as timm matches them (fnmatch;
    xcit returns ``{"pos_embed.*", "cls_token"}``)."""
    root = _unwrapped(model)
    method = getattr(root, "no_weight_decay", None)
    return sorted(method() if callable(method) else ())


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any DDP / torch.compile / FSDP1 wrappers."""
    while True:
        inner = next((c for n, c in model._modules.items() if _naming.is_wrapper(model, n)), None)
        if inner is None:
            return model
        model = inner


def walk_parameters(
    model: torch.nn.Module,
) -> list[tuple[str, str, torch.nn.Module, str, torch.nn.Module]]:
    """``(name, logical name, owner, local name, layer)`` for each distinct parameter.

    A parametrized weight (``torch.nn.utils.parametrize``, e.g. ``weight_norm``) is reported on
    the tensor the optimizer updates (``parametrizations.weight.original``), with the logical
    name ``weight`` of the layer it belongs to for patterns and classification.
    """
    seen: set[int] = set()
    out = []
    modules = _naming.named_modules(model)
    for qualified, module in modules:
        for local, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{qualified}.{local}" if qualified else local
            logical, layer = name, module
            parts = qualified.split(".")
            if type(module).__name__ == "ParametrizationList" and len(parts) >= 2:
                # <layer>.parametrizations.<weight>.original  ->  <layer>.<weight>
                layer_path = ".".join(parts[:-2])
                logical = f"{layer_path}.{parts[-1]}" if layer_path else parts[-1]
                layer = model.get_submodule(layer_path) if layer_path else model
            out.append((name, logical, module, local, layer))
    # Parameters engines took out of their modules (FSDP1's flat parameters), under their names.
    paths = {id(module): path for path, module in modules}
    for module, local in held_away(model):
        name = f"{paths[id(module)]}.{local}".strip(".")
        out.append((name, name, module, local, module))
    return out


def rule(
    logical: str,
    owner: torch.nn.Module,
    local: str,
    param: torch.Tensor | None,
    layer: torch.nn.Module,
    norm: bool,
) -> str | None:
    """The policy, as timm states it: which of ``regularize``'s arguments covers a
    parameter (``"norm"``, ``"embeddings"``, ``"bias"``, ``"kernel"``), or None for the other
    vectors (scales, PReLU slopes), regularized only by an explicit ``add_regularizer``."""
    last = logical.rpartition(".")[2]
    if norm:
        return "norm"
    if isinstance(layer, _EMBEDDING_TYPES) and last == "weight":
        return "embeddings"
    if "bias" in last:
        return "bias"
    if len(real_shape(owner, local, param) or ()) >= 2:  # as the model made it
        return "kernel"
    return None
