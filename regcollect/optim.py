"""Weight penalties applied inside ``optimizer.step()``: ``attach_optimizer``.

Through autograd, a penalty costs a forward and a backward pass over the weights and a fresh
gradient tensor per parameter. Inside the optimizer step it is what ``weight_decay`` is: one
in-place multi-tensor update per group of parameters sharing a coefficient.

- **Coupled** (default): before the optimizer's own math, ``grad += 2 * l2 * w`` and
  ``grad += l1 * sign(w)``: exactly what ``SGD(weight_decay=wd)``/``Adam(weight_decay=wd)`` do
  with ``wd = 2 * l2``, but per parameter, with L1 too, and only on the regularized tensors.
- **Decoupled**: the weights themselves shrink, scaled by their group's current learning rate:
  L2 as ``AdamW`` does (``w *= 1 - lr * 2 * l2`` before the update), L1 as the proximal step
  after the update (soft-thresholding by ``lr * l1``), which sets weights exactly to zero.

L2-SP and group lasso penalties are applied too: coupled, ``grad += 2 * l2 * (w - w0)`` and
``grad += factor * w_g / ||w_g||``; decoupled, ``w -= lr * 2 * l2 * (w - w0)`` before the update
and the group lasso's proximal step after it (``w_g *= max(0, 1 - lr * factor / ||w_g||)``),
which sets whole groups exactly to zero. A scheduled coefficient is read before the step.

Only those penalties on (unsharded) parameters the optimizer holds are applied this way;
orthogonal, custom and activity penalties stay in ``loss()`` with their gradients. For the
penalties the optimizer applies, ``loss()`` still returns the full value (the printed loss and
the summary stay honest), but that part carries no gradient: nothing is counted twice.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ._checks import RegcollectWarning
from .beyond import L2SP, GroupLasso, reference_of
from .entries import WEIGHT
from .handle import Handle
from .penalties import Coefficient, fused_terms
from .sharding import PLAIN

if TYPE_CHECKING:
    from .collection import Collection

__all__ = ["OptimizerAttachment", "attach_optimizer"]


class OptimizerAttachment:
    """The hooks on one optimizer, and the grouping of its parameters by coefficient."""

    def __init__(self, optimizer: torch.optim.Optimizer, coll: Collection, decoupled: bool):
        self.optimizer = weakref.ref(optimizer)
        self.collection = weakref.ref(coll)
        self.decoupled = decoupled
        self._key: tuple[Any, ...] | None = None
        # Per param group: [(kind, coefficient, [params])], built when something changes.
        self._groups: list[list[tuple[str, Any, list[torch.Tensor], list[Any]]]] = []
        self._coefs: list[list[float]] = []
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)
        self._warned_decay = False

    def held(self) -> set[int]:
        """Ids of the parameters the optimizer holds (whose penalties it applies)."""
        optimizer = self.optimizer()
        if optimizer is None:
            return set()
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    # -- the grouping -----------------------------------------------------------------------

    def _grouping(self, optimizer: torch.optim.Optimizer, coll: Collection) -> None:
        key = (
            coll._version,
            tuple(id(p) for group in optimizer.param_groups for p in group["params"]),
        )
        if key == self._key:
            return
        if self._key is not None and key[1] != self._key[1]:
            coll._changed()  # the optimizer holds other parameters: loss() must re-plan
        # id(tensor) -> [(kind, coefficient, extra)]: "l1"/"l2" terms, "l2sp" with its
        # reference, "group" (group lasso) with its axis.
        coefficients: dict[int, list[tuple[str, Coefficient, Any]]] = {}
        for entry in coll.entries():
            if entry.kind != WEIGHT:
                continue
            tensor = entry.resolve()
            if tensor is None:
                continue
            terms = fused_terms(entry.regularizer)
            reg = entry.regularizer
            if terms:
                coefficients[id(tensor)] = [(k, c, None) for k, c in terms if c]
            elif reg.applied_in_step and type(tensor) in PLAIN and entry.module is not None:
                # Sharded tensors keep these in loss(), as the plan does.
                if isinstance(reg, L2SP):
                    # Looked up at each step: model.to() replaces the buffer.
                    where = (weakref.ref(entry.module), entry.param)
                    coefficients[id(tensor)] = [("l2sp", reg.l2, where)]
                elif isinstance(reg, GroupLasso):
                    coefficients[id(tensor)] = [("group", reg.factor, reg)]
        self._groups = []
        doubled = []
        for group in optimizer.param_groups:
            by_term: dict[tuple[str, Any], tuple[list[torch.Tensor], list[Any]]] = {}
            for p in group["params"]:
                for kind, coef, extra in coefficients.get(id(p), ()):
                    term = (kind, coef if kind != "group" else (coef, extra.axis))
                    params, extras = by_term.setdefault(term, ([], []))
                    params.append(p)
                    extras.append(extra)
                if id(p) in coefficients and group.get("weight_decay", 0.0):
                    doubled.append(p)
            self._groups.append(
                [
                    (kind, coef[0] if kind == "group" else coef, ps, extras)
                    for (kind, coef), (ps, extras) in by_term.items()
                ]
            )
        self._key = key
        if doubled and not self._warned_decay:
            self._warned_decay = True
            warnings.warn(
                f"{len(doubled)} parameters regularized by regcollect are also in a parameter "
                f"group with weight_decay={_first_decay(optimizer)} on "
                f"{type(optimizer).__name__}: they are regularized twice. Set weight_decay=0 "
                "for them (rc.l2(wd / 2) is SGD's weight_decay=wd).",
                RegcollectWarning,
                stacklevel=4,
            )

    # -- the hooks --------------------------------------------------------------------------

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        coll = self.collection()
        if coll is None:
            return None
        self._grouping(optimizer, coll)
        # Scheduled coefficients are read once, before the step advances them.
        self._coefs = [[float(c) for _, c, _, _ in terms] for terms in self._groups]
        # args are step()'s own: (optimizer, closure) when the closure is positional.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._apply_before(optimizer)
            return None
        # step(closure) runs the closure (zero_grad, forward, backward) inside step(), after
        # this hook: the penalty goes on the gradients each call computes (L-BFGS calls it
        # several times per step), and the decoupled decay once, after the first call, where
        # AdamW decays after its closure.
        calls = 0

        def closure_then_penalty() -> Any:
            nonlocal calls
            result = closure()
            calls += 1
            if calls == 1 or not self.decoupled:
                self._apply_before(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_penalty}
        return (args[0], closure_then_penalty, *args[2:]), kwargs

    def _apply_before(self, optimizer: torch.optim.Optimizer) -> None:
        """What the step applies before the optimizer's own math: the coupled gradients, or
        the decoupled L2 decay of the weights."""
        with torch.no_grad():
            for group, terms, coefs in zip(optimizer.param_groups, self._groups, self._coefs):
                lr = _lr(group)
                # maximize=True negates .grad in the optimizer's math, and adds weight decay
                # after that: the penalty's gradient goes in negated, so that it still shrinks.
                sign = -1.0 if group.get("maximize", False) else 1.0
                for (kind, _, params, extras), coef in zip(terms, coefs):
                    live, live_extras = _live(params, extras)
                    if not live:
                        continue
                    if kind == "group":
                        if not self.decoupled:
                            for p, grad, reg in zip(live, _grads(live), live_extras):
                                grad.add_(_group_directions(p, reg), alpha=sign * coef)
                        continue
                    if kind == "l2sp":
                        refs = [_reference(where) for where in live_extras]
                        if self.decoupled:  # towards the reference, as AdamW towards zero
                            torch._foreach_lerp_(live, refs, lr * 2.0 * coef)
                        else:
                            for part, ref_part in _chunks(live, refs):
                                diffs = torch._foreach_sub(part, ref_part)
                                torch._foreach_add_(_grads(part), diffs, alpha=sign * 2.0 * coef)
                                del diffs  # before the next chunk's
                        continue
                    if not self.decoupled:
                        if kind == "l2":  # in place: no temporary at all
                            torch._foreach_add_(_grads(live), live, alpha=sign * 2.0 * coef)
                        else:
                            for (part,) in _chunks(live):
                                signs = torch._foreach_sign(part)
                                torch._foreach_add_(_grads(part), signs, alpha=sign * coef)
                                del signs  # before the next chunk's
                    elif kind == "l2":
                        torch._foreach_mul_(live, 1.0 - lr * 2.0 * coef)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.decoupled:
            return
        with torch.no_grad():
            for group, terms, coefs in zip(optimizer.param_groups, self._groups, self._coefs):
                lr = _lr(group)
                for (kind, _, params, extras), coef in zip(terms, coefs):
                    live, live_extras = _live(params, extras)
                    if kind == "l1" and live:
                        _soft_threshold_(live, lr * coef)
                    elif kind == "group":
                        for p, reg in zip(live, live_extras):
                            _block_soft_threshold_(p, reg, lr * coef)


def _live(params: list[torch.Tensor], extras: list[Any]) -> tuple[list[torch.Tensor], list[Any]]:
    """The parameters with a gradient this step, and their extras: the others are skipped, as
    ``weight_decay`` skips them."""
    live = [(p, extra) for p, extra in zip(params, extras) if p.grad is not None]
    return [p for p, _ in live], [extra for _, extra in live]


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params`` (all present: ``params`` come from ``_live``)."""
    return [p.grad for p in params if p.grad is not None]


def _reference(where: tuple[Any, str]) -> torch.Tensor:
    """The current L2SP reference of a parameter (its module's buffer)."""
    module_ref, name = where
    module = module_ref()
    if module is None:
        raise RuntimeError(f"the module holding {name!r} is gone")
    return reference_of(module, name)


def _group_norms(p: torch.Tensor, reg: GroupLasso) -> torch.Tensor:
    """Each group's L2 norm, shaped to broadcast against ``p`` along the group axis."""
    shape = [1] * p.dim()
    shape[reg.axis % p.dim()] = -1
    return reg.norms(p).reshape(shape)


def _group_directions(p: torch.Tensor, reg: GroupLasso) -> torch.Tensor:
    """``p_g / ||p_g||`` per group (0 for a zero group): the group lasso's (sub)gradient."""
    norms = _group_norms(p, reg)
    return p / norms.clamp_min(torch.finfo(norms.dtype).tiny)


def _block_soft_threshold_(p: torch.Tensor, reg: GroupLasso, threshold: float) -> None:
    """``p_g *= max(0, 1 - threshold / ||p_g||)`` in place: the proximal step of the group
    lasso, which sets every group whose norm is below ``threshold`` exactly to zero."""
    norms = _group_norms(p, reg)
    p.mul_((1.0 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0.0))


def _soft_threshold_(params: list[torch.Tensor], threshold: float) -> None:
    """``p = sign(p) * max(|p| - threshold, 0)`` in place: the proximal step of L1."""
    # p -= clamp(p, -threshold, threshold): exactly 0 where |p| <= threshold, p -/+ threshold
    # elsewhere; in-place pointwise steps (DTensors too), one temporary per chunk.
    for (part,) in _chunks(params):
        shrink = torch._foreach_clamp_max(part, threshold)
        torch._foreach_clamp_min_(shrink, -threshold)
        torch._foreach_sub_(part, shrink)
        del shrink  # before the next chunk's


# The step's temporaries (signs, differences to a reference, the proximal clamp) are made a
# few tensors at a time: at most this many bytes, or one tensor if it is larger. So the step
# holds at most one gradient-sized tensor more, as SGD's weight_decay does on the CPU (its
# foreach form on CUDA holds a fresh gradient for every parameter at once), where one call
# for all of them would hold a copy of every regularized parameter.
_TEMPORARY_BYTES = 1 << 20


def _chunks(*lists: list[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], ...]]:
    """Parallel slices of ``lists`` whose tensors in the first list total at most
    ``max(_TEMPORARY_BYTES, the largest of them)`` bytes."""
    sizes = [p.nbytes for p in lists[0]]
    if not sizes:
        return
    budget = max(_TEMPORARY_BYTES, max(sizes))
    start, held = 0, 0
    for i, size in enumerate(sizes):
        if held + size > budget:
            yield tuple(items[start:i] for items in lists)
            start, held = i, 0
        held += size
    yield tuple(items[start:] for items in lists)


def _lr(group: dict[str, Any]) -> float:
    lr = group.get("lr", 0.0)
    return float(lr)  # a tensor learning rate (capturable optimizers) is read here


def _first_decay(optimizer: torch.optim.Optimizer) -> float:
    return next(
        (float(g["weight_decay"]) for g in optimizer.param_groups if g.get("weight_decay")), 0.0
    )


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
    closure computes.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, ...), or a wrapper
            that steps one it holds as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``,
            Lightning's ``LightningOptimizer``): the wrapped optimizer is attached.
        decoupled: False (coupled): the penalty's gradient is added to ``.grad`` before the
            optimizer's math, as ``weight_decay`` does in SGD and Adam. True: the weights are
            decayed directly, scaled by the group's learning rate, as ``AdamW`` does for L2;
            L1 becomes a proximal step (soft-thresholding) that produces exact zeros.
        collection: the collection whose penalties are applied (default: the active one).

    Returns:
        A handle; ``.remove()`` restores the autograd path.

    Raises:
        TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper of
            one, or ``decoupled`` is not a bool.

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
    from .context import active_collection

    stepped = _stepped(optimizer)
    if stepped is None:
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer (or a wrapper holding one as "
            f".optimizer, like accelerate's AcceleratedOptimizer), got {type(optimizer).__name__}"
        )
    optimizer = stepped
    if not isinstance(decoupled, bool):
        raise TypeError(f"decoupled must be True or False, got {decoupled!r}")
    coll = active_collection(collection)
    attachment = OptimizerAttachment(optimizer, coll, decoupled)
    coll._attach(attachment)

    def undo() -> None:
        attachment.remove()
        coll._detach_optimizer(attachment)

    return Handle([], undo)


def _stepped(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer whose ``step()`` runs the update: the innermost one a wrapper
    holds as ``.optimizer`` and steps (accelerate's ``AcceleratedOptimizer``, which has no
    step hooks of its own; Lightning's ``LightningOptimizer``), or ``optimizer`` itself.
    Attaching the wrapper or the wrapped optimizer is then one and the same attachment."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if isinstance(optimizer, torch.optim.Optimizer) and hasattr(
        optimizer, "_optimizer_step_pre_hooks"
    ):
        return optimizer
    return None


def held_by(attachments: Iterable[OptimizerAttachment]) -> set[int]:
    """Ids of the parameters the attached optimizers hold."""
    out: set[int] = set()
    for a in attachments:
        out |= a.held()
    return out
