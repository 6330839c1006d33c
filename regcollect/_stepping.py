"""The top-level functions of the optimizer side: ``attach_optimizer`` (the penalties applied in
the optimizer's step) and ``param_groups`` (the L2 penalties as the optimizer's own
``weight_decay``), on the active collection."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import keywords_checked
from ._collection.collection import Collection
from ._collection.handle import Handle
from ._context import active_collection

__all__ = ["attach_optimizer", "param_groups"]


@keywords_checked
def attach_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    decoupled: bool = False,
    collection: Collection | None = None,
) -> Handle:
    """Apply the collection's L1, L2 and L1L2 weight penalties inside ``optimizer.step()``.

    From now on, for the parameters ``optimizer`` holds, those penalties are applied by the
    step instead of through autograd; ``rc.loss()`` still returns their value (without a
    gradient), so keep adding it to the loss you print. ``.remove()`` on the returned handle
    undoes it. Attaching the same optimizer to the collection again (set-up code run twice,
    or to switch ``decoupled``) replaces the first attachment: each penalty is applied once.
    ``step(closure)`` (L-BFGS, Lightning) works too: the penalty goes on the gradients the
    closure computes. Optimizers that differentiate the gradients in their step (AdaHessian,
    Sophia, after ``backward(create_graph=True)``) see the coupled penalty in their
    Hessian-vector product; the decoupled decay is added after their update.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, fused or not, under
            ``GradScaler`` too), or a wrapper whose ``step()`` drives one it holds as
            ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
            ``LightningOptimizer``), ``.base_optimizer`` (SAM) or ``._base_optimizer``
            (timm's ``Lookahead``): the innermost optimizer, the one real update per step,
            is attached, so the penalty is applied once per update.
        decoupled: False (coupled): the penalty's gradient is added to ``.grad`` before the
            optimizer's math, as ``weight_decay`` does in SGD and Adam. True: the weights are
            decayed directly, scaled by the group's learning rate, as ``AdamW`` does for L2;
            L1 becomes a proximal step (soft-thresholding) that produces exact zeros.
        collection: the collection whose penalties are applied (default: the active one).

    Returns:
        A handle; ``.remove()`` restores the autograd path.

    Raises:
        TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper of
            one; the optimizer it steps has no step hooks (it never ran
            ``Optimizer.__init__``) and holds no optimizer under a known name; or
            ``decoupled`` is not a bool.
        ValueError: ``decoupled=True`` on an optimizer with a parameter group whose ``lr``
            is None (Adafactor's relative step): the decoupled step needs a learning rate;
            a DeepSpeed ZeRO optimizer (or engine), or an optimizer holding FSDP1 flat
            parameters (``use_orig_params=False``): they update flat copies, not the
            regularized parameters.

    Examples:
        >>> import torch, regcollect as rc
        >>> coll = rc.Collection()
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> handle = rc.attach_optimizer(opt, collection=coll)
        >>> coll.loss().requires_grad  # the value is there; the step applies the gradient
        False
        >>> handle.remove()
    """
    return active_collection(collection).attach_optimizer(optimizer, decoupled=decoupled)


def param_groups(
    model_or_params: Any, *, collection: Collection | None = None, **group_defaults: Any
) -> list[dict[str, Any]]:
    """Parameter groups in which the optimizer's own ``weight_decay`` applies the declared L2
    penalties, on exactly the declared tensors.

    Each parameter carrying only ``rc.l2(c)`` (or ``rc.l1_l2(0, c)``) goes into a group with
    ``weight_decay = 2 * c`` (one group per coefficient), every other parameter into one
    with ``weight_decay = 0``. Any optimizer built from them (``torch.optim``, timm,
    pytorch_optimizer, HF's ``optimizer_cls_and_kwargs``) then applies its own decay formula
    (Lamb's trust ratio, AdamW's decoupled decay, ...) to those tensors and no other. From
    this call on, ``rc.loss()`` gives those penalties' value without a gradient (the
    optimizer applies them) and the summary still shows them. A scheduled coefficient sets
    its group's ``weight_decay`` before each step. L1, L2-SP, group lasso, orthogonal and
    custom penalties are not decays: their parameters get ``weight_decay = 0`` and their
    penalties stay in ``rc.loss()`` (or ``rc.attach_optimizer``). A recorded parameter that
    an optimizer steps in a group this function did not make (its penalty then applied by
    nothing), or a regularized one in such a group that another collection's or an older
    regularizer's group decays (applied twice), is warned once.

    Args:
        model_or_params: an ``nn.Module``, or an iterable of its parameters.
        collection: the collection whose penalties the groups apply (default: the active
            one).
        **group_defaults: options every group gets (``lr=...``, ``betas=...``); not
            ``params`` nor ``weight_decay``, which the groups set.

    Returns:
        A list of parameter-group dicts (decaying groups first, in the order the parameters
        first use their coefficient; each also holds ``"regcollect_l2": c``).

    Raises:
        TypeError: ``model_or_params`` is neither a module nor an iterable of tensors.
        ValueError: ``group_defaults`` sets ``params`` or ``weight_decay``.

    Examples:
        >>> import torch, regcollect as rc
        >>> coll = rc.Collection()
        >>> layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
        >>> groups = rc.param_groups(layer, collection=coll)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 1.0), (1, 0.0)]
        >>> opt = torch.optim.AdamW(groups, lr=0.1)
        >>> coll.loss().requires_grad  # the value is there; AdamW applies the decay
        False
    """
    return active_collection(collection).param_groups(model_or_params, **group_defaults)
