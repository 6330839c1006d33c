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

L2-SP and group lasso penalties are applied too (their step math is in their modules: each
part of a penalty is a ``Term`` that knows its coupled gradient and its decoupled steps). A
scheduled coefficient is read before the step.

Only those penalties on parameters the optimizer holds are applied this way; orthogonal,
custom and activity penalties stay in ``loss()`` with their gradients. For the penalties the
optimizer applies, ``loss()`` still returns the full value (the printed loss and the summary
stay honest), but that part carries no gradient: nothing is counted twice, not even through
the unsharded parameter FSDP2 puts on a module while its parameters are gathered (``held``).

On DTensor parameters (tensor parallelism, FSDP2, both on a 2-D mesh) the step math runs on
the local tensors, by the placement rules of ``regcollect._distributed.dtensor_step``; a
decoupled step those rules cannot make exact is refused, naming the parameter.

Gradients that carry a graph (``backward(create_graph=True)``), which a Hessian-based step
differentiates (AdaHessian, Sophia): the coupled gradient goes in differentiably, so that the
Hessian-vector product sees the penalty's Hessian; the decoupled steps before the update are
computed on copies and added after it, since changing in place the weights that graph saved
would make its differentiation fail.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from .._checks import warn_user
from .._distributed.seam import placement_of, step_lists, stepped_twins, unstepped
from .._engine.plan import steppable
from .._penalties.base import Term
from .._penalties.kernel import kernel_of
from .wrappers import by_graph, check_learning_rates, first_decay, groups_key, lr_of, skipped

__all__ = ["OptimizerAttachment", "held_by"]


class Regularized(Protocol):
    """What an attachment reads of an entry (``regcollect.Entry``): a weight entry has a
    module and a parameter name."""

    @property
    def module(self) -> torch.nn.Module | None: ...

    @property
    def param(self) -> str | None: ...

    @property
    def regularizer(self) -> Any: ...

    @property
    def name(self) -> str: ...

    def resolve(self) -> torch.Tensor | None: ...


# One part the step applies to some parameters of a group: (term, coefficient, parameters,
# where each parameter's state lives: Term.locate, whether any parameter is a DTensor).
Part = tuple[Term, Any, list[torch.Tensor], list[Any], bool]


class OptimizerAttachment:
    """The hooks on one optimizer, and its parameters grouped by penalty term. The math is
    in ``regcollect._step``; this class only gathers what it needs, as ``torch.optim``'s
    ``_init_group`` does."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        entries: Callable[[], Sequence[Regularized]],
        key: Callable[[], tuple[Any, ...] | None],
        others: Callable[[OptimizerAttachment], set[int]],
        owner: int,
        decoupled: bool,
    ):
        """
        Args:
            optimizer: The optimizer whose step applies the penalties.
            entries: The collection's entries (called when ``key`` changes).
            key: What the penalties the step applies depend on (registrations, the
                attached optimizers' parameter groups); None once the collection is gone.
            others: The parameters the collection's other attachments hold.
            owner: Names the collection in the marks left on gradients (see ``_stamp``).
            decoupled: AdamW's decay and proximal steps, or the coupled gradient.
        """
        if decoupled:
            check_learning_rates(optimizer)
        self.optimizer = weakref.ref(optimizer)
        self._entries, self._state_key, self._others = entries, key, others
        self._owner = owner
        self.decoupled = decoupled
        self._key: tuple[Any, ...] | None = None
        self._groups: list[list[Part]] = []  # per param group
        # Parameters another attached optimizer holds too: their gradient gets the coupled
        # penalty once, whichever optimizer steps first (see _coupled).
        self._shared: set[int] = set()
        self._coefs: list[list[float]] = []
        # Decoupled steps deferred past the update: (parameters, what to add to them).
        self._deferred: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)
        self._warned_decay = False
        self._names: dict[int, str] = {}  # id(DTensor parameter) -> its entry's name

    def held(self) -> set[int]:
        """Ids of the parameters the optimizer holds (whose penalties it applies), and of the
        unsharded parameters FSDP2 puts on the modules in their place while it has them
        gathered, where the step applies the penalty to the sharded one: ``loss()`` gives
        their value without a gradient too (through them, it reached the sharded parameter's
        gradient after FSDP2's reduce-scatter, and the step added it again)."""
        optimizer = self.optimizer()
        if optimizer is None:
            return set()
        ids = self._held_parameters(optimizer)
        entries = [e for e in self._entries() if e.param is not None and e.module is not None]
        twins = stepped_twins([m for e in entries if (m := e.module) is not None])
        for entry in entries if twins else ():
            tensor = entry.resolve()
            sharded = twins.get(id(tensor)) if tensor is not None else None
            if sharded is not None and id(sharded) in ids and steppable(sharded, entry.regularizer):
                ids.add(id(tensor))
        return ids

    @staticmethod
    def _held_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def key(self) -> tuple[Any, ...] | None:
        """What ``held()`` depends on, cheaply: the optimizer (None once collected) and its
        parameter groups' lists (``add_param_group`` adds one). Part of the collection's
        staleness key, so that ``loss()`` re-plans when the step starts or stops applying a
        penalty."""
        optimizer = self.optimizer()
        if optimizer is None:
            return None
        return (id(optimizer), *groups_key(optimizer))

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    # -- the grouping -----------------------------------------------------------------------

    def _grouping(self, optimizer: torch.optim.Optimizer, key: tuple[Any, ...]) -> None:
        if key == self._key:
            return
        parts = self._parts(optimizer)
        self._groups = []
        doubled = []
        for group in optimizer.param_groups:
            by_part: dict[tuple[Term, Any], tuple[list[torch.Tensor], list[Any]]] = {}
            for p in group["params"]:
                for term, coef, where in parts.get(id(p), ()):
                    params, places = by_part.setdefault((term, coef), ([], []))
                    params.append(p)
                    places.append(where)
                if id(p) in parts and group.get("weight_decay", 0.0):
                    doubled.append(p)
            self._groups.append(
                [
                    (term, coef, ps, places, any(placement_of(p).steps is not None for p in ps))
                    for (term, coef), (ps, places) in by_part.items()
                ]
            )
        others = self._others(self)
        self._shared = self.held() & others if others else set()
        self._key = key
        if doubled and not self._warned_decay:
            self._warned_decay = True
            warn_user(
                f"parameters regularized by regcollect ({len(doubled)}) are also in a parameter "
                f"group with weight_decay={first_decay(optimizer)} on "
                f"{type(optimizer).__name__}: they are regularized twice. Set weight_decay=0 "
                "for them (the optimizer's default, as AdamW's 0.01, counts too; "
                "rc.l2(wd / 2) is SGD's and AdamW's weight_decay=wd, AdamW's decoupled)."
            )

    def _parts(self, optimizer: torch.optim.Optimizer) -> dict[int, list[tuple[Term, Any, Any]]]:
        """id(parameter) -> the parts the step applies to it, by the rule loss() follows too
        (engine.steppable); the names of the DTensor parameters, for the step's errors.

        Raises:
            ValueError: Decoupled, a penalty with step math on a DTensor parameter the
                optimizer holds, whose placements the step cannot apply it on exactly.
        """
        held = self._held_parameters(optimizer)
        entries = [e for e in self._entries() if e.param is not None]
        twins = stepped_twins([e.module for e in entries if e.module is not None])
        parts: dict[int, list[tuple[Term, Any, Any]]] = {}
        self._names = {}
        for entry in entries:
            # Weight entries (those with a parameter): activity and bare-tensor ones have none.
            tensor = entry.resolve()
            if tensor is None:
                continue
            tensor = twins.get(id(tensor), tensor)  # FSDP2's sharded one, which steps
            reg = entry.regularizer
            terms = [(t, c) for t, c in kernel_of(reg).terms(reg) if c]
            if not steppable(tensor, reg):
                why = None
                if self.decoupled and terms and id(tensor) in held:
                    why = unstepped(tensor, reg, [t for t, _ in terms])
                if why is not None:
                    raise ValueError(f"attach_optimizer(decoupled=True): {entry.name!r} is {why}.")
                continue
            parts[id(tensor)] = [(t, c, t.locate(entry.module, entry.param)) for t, c in terms]
            if placement_of(tensor).steps is not None:
                self._names[id(tensor)] = entry.name
        return parts

    # -- the hooks --------------------------------------------------------------------------

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        key = self._state_key()
        if key is None:  # the collection is gone
            return None
        self._grouping(optimizer, key)
        # Scheduled coefficients are read once, before the step advances them.
        self._coefs = [[float(c) for _, c, _, _, _ in parts] for parts in self._groups]
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
        the decoupled steps before the update (L2's decay, L2-SP's pull)."""
        # A fused optimizer under GradScaler unscales inside its step: the coupled penalty's
        # gradient goes in multiplied by the scale it will divide by; the decoupled decay is
        # not applied on a step the scaler skips.
        grad_scale = None if self.decoupled else getattr(optimizer, "grad_scale", None)
        self._deferred = []
        skip, keep = skipped(optimizer) if self.decoupled else (False, None)
        if skip:
            return
        with torch.no_grad():
            for group, parts, coefs in zip(optimizer.param_groups, self._groups, self._coefs):
                # maximize=True negates .grad in the optimizer's math, and adds weight decay
                # after that: the penalty's gradient goes in negated, so that it still shrinks.
                sign = -1.0 if group.get("maximize", False) else 1.0
                lr = lr_of(group, optimizer) if self.decoupled else None
                for (term, _, params, places, sharded), coef in zip(parts, coefs):
                    live, where = self._live(params, places)
                    # Gradients that carry their own graph (backward(create_graph=True)): the
                    # step may differentiate them (AdaHessian, Sophia: Hessian-vector products
                    # through the graph that saved these weights).
                    (live, where), (deep, deep_where) = by_graph(live, where)
                    if lr is not None:  # decoupled
                        if sharded:  # DTensors: their local tensors, by the placement rules
                            live, where, _ = self._local(live, where, None)
                        if live:
                            term.before_(coef, lr, live, where, keep)
                        if deep and type(term).before_ is not Term.before_:
                            self._defer(term, coef, lr, deep, deep_where, keep)
                        continue
                    for ps, wh, graph in zip((live, deep), (where, deep_where), (False, True)):
                        # On a graph gradient the penalty's gradient goes in differentiably,
                        # so that the Hessian-vector product sees the penalty's Hessian too.
                        with torch.enable_grad() if graph else contextlib.nullcontext():
                            self._coupled(term, coef, ps, wh, sharded, sign, grad_scale)
                if not self.decoupled and self._shared:
                    self._stamp(group)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The decoupled steps after the optimizer's update: the proximal steps (L1's soft
        threshold, the group lasso's block soft threshold)."""
        if not self.decoupled:
            return
        with torch.no_grad():
            for params, deltas in self._deferred:
                torch._foreach_add_(params, deltas)
        self._deferred = []
        skip, keep = skipped(optimizer)
        if skip:
            return
        with torch.no_grad():
            for group, parts, coefs in zip(optimizer.param_groups, self._groups, self._coefs):
                lr = lr_of(group, optimizer)
                for (term, _, params, places, sharded), coef in zip(parts, coefs):
                    live, where = self._live(params, places)
                    if sharded:
                        live, where, _ = self._local(live, where, None)
                    if live:
                        term.after_(coef, lr, live, where, keep)

    def _defer(
        self,
        term: Term,
        coef: float,
        lr: Any,
        params: list[torch.Tensor],
        where: list[Any],
        keep: torch.Tensor | None,
    ) -> None:
        """The decoupled step before the update, for weights the step's own differentiation
        still needs (the graph of their gradients saved them: changed in place now, that
        graph would fail). It is computed now, from the weights the gradient was taken at,
        on copies, and its change added after the update: ``w - lr * u + (step(w) - w)``,
        which is AdamW's ``step(w) - lr * u``."""
        copies = [p.detach().clone() for p in params]
        term.before_(coef, lr, copies, where, keep)
        torch._foreach_sub_(copies, [p.detach() for p in params])
        self._deferred.append((params, copies))

    def _live(
        self, params: list[torch.Tensor], places: list[Any]
    ) -> tuple[list[torch.Tensor], list[Any]]:
        """The parameters that train and have a gradient this step, and where their state
        lives: the others are skipped, as ``weight_decay`` skips those without a gradient. A
        frozen parameter keeps a zero gradient through ``zero_grad(set_to_none=False)``; it
        is skipped too, as ``loss()`` leaves it out (frozen parameters contribute nothing).
        Coupled, a parameter another attached optimizer holds too is skipped when its gradient
        has the penalty already (it has not changed since that optimizer added it): the
        gradient of the total loss at the weights the backward saw, as through autograd,
        whichever optimizer steps first."""
        if self._shared and not self.decoupled:
            shared, penalized = self._shared, self._penalized
            live = [
                (p, where)
                for p, where in zip(params, places)
                if p.grad is not None
                and p.requires_grad
                and (id(p) not in shared or not penalized(p.grad))
            ]
        else:
            live = [
                (p, where)
                for p, where in zip(params, places)
                if p.grad is not None and p.requires_grad
            ]
        return [p for p, _ in live], [where for _, where in live]

    def _coupled(
        self,
        term: Term,
        coef: Any,
        params: list[torch.Tensor],
        where: list[Any],
        sharded: bool,
        sign: float,
        grad_scale: Any,
    ) -> None:
        """The coupled step of ``term`` on ``params`` (each with a gradient, ``_live``)."""
        grads = [p.grad for p in params if p.grad is not None]
        if sharded:  # DTensors: their local tensors, by the placement rules
            params, where, local = self._local(params, where, grads)
            grads = local or []
        if params:
            term.coupled_(coef, params, grads, where, sign=sign, grad_scale=grad_scale)

    def _local(
        self, params: list[torch.Tensor], where: list[Any], grads: list[Any] | None
    ) -> tuple[list[torch.Tensor], list[Any], list[torch.Tensor] | None]:
        names = self._names
        return step_lists(params, where, grads, lambda i: repr(names.get(id(params[i]), "?")))

    def _penalized(self, grad: torch.Tensor) -> bool:
        return getattr(grad, _STAMP, None) == (self._owner, grad._version)

    def _stamp(self, group: dict[str, Any]) -> None:
        """Mark the shared parameters' gradients as holding this collection's penalty, with
        their version counter: a backward or zero_grad() in place changes it."""
        for p in group["params"]:
            if id(p) in self._shared and p.grad is not None:
                setattr(p.grad, _STAMP, (self._owner, p.grad._version))


_STAMP = "_regcollect_penalized"


def held_by(attachments: Iterable[OptimizerAttachment]) -> set[int]:
    """Ids of the parameters the attached optimizers hold."""
    out: set[int] = set()
    for a in attachments:
        out |= a.held()
    return out
