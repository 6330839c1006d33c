"""Parameter groups whose ``weight_decay`` is the declared L2 penalty: ``rc.param_groups``.

``rc.l2(c)`` is ``c * sum(w**2)``, whose gradient ``2c * w`` is what ``weight_decay = 2c``
adds in ``SGD``/``Adam``, and what ``AdamW`` decays by (``w *= 1 - lr * 2c``). Many
optimizers apply their decay in a formula of their own (Lamb and Lars inside the trust ratio,
AdamP and SGDP projected, NovoGrad normalised, Prodigy scaled by its step estimate,
ScheduleFree on its averaged sequence), which no penalty added to the gradient or the weights
reproduces. Given parameter groups, each of them applies its own formula: the groups put
``weight_decay = 2c`` on exactly the tensors that carry only ``rc.l2(c)`` (grouped by
coefficient) and ``weight_decay = 0`` on every other one, as timm's
``param_groups_weight_decay`` and HF's ``get_decay_parameter_names`` do for their rules.

Each decaying group carries ``MARK`` (``"regcollect_l2"``: the coefficient ``c``, plain data
that ``state_dict()`` saves). From the call on, the collection records those parameters
(``GroupDecay``): ``loss()`` gives their penalty's value without a gradient (the optimizer
applies it), as for an attached optimizer. A scheduled coefficient sets the group's
``weight_decay`` before each step (the step that advances the schedule reads the value it had
before, as the attached step does). Before each step an optimizer takes, the groups it holds
are checked against the record, once per change: a recorded parameter in a group
``param_groups`` did not make is applied by nothing (forgotten), and a regularized parameter
in a decaying group that the collection did not record (or whose regularizer changed since)
gets the penalty twice (doubled); either is warned once.

Penalties other than a lone L2 (L1, L1L2 with an L1 part, L2-SP, group lasso, orthogonal,
custom ones) are left to ``loss()`` or to ``attach_optimizer``: their parameters get
``weight_decay = 0``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .._checks import warn_user
from .._engine.plan import steppable
from .._penalties.base import Coefficient, Regularizer
from .._penalties.kernel import kernel_of
from ..schedules import Schedule
from .attach import Regularized
from .wrappers import groups_key

__all__ = ["MARK", "GroupDecay", "build", "declared_l2", "l2_coefficient", "parameters"]

MARK = "regcollect_l2"


def l2_coefficient(reg: Regularizer) -> Coefficient | None:
    """``c`` when ``reg`` is ``c * sum(x**2)`` alone (its only non-zero part is a square sum:
    ``L2(c)``, ``L1L2(0, c)``), else None. A schedule counts whatever its current value."""
    terms = [(term, coef) for term, coef in kernel_of(reg).terms(reg) if coef]
    if len(terms) == 1 and terms[0][0].p == 2:
        return terms[0][1]
    return None


def declared_l2(entries: Iterable[Regularized]) -> dict[int, Coefficient]:
    """``id(parameter) -> c`` for the weight entries whose parameter carries only
    ``rc.l2(c)`` and whose step math an optimizer can apply (``steppable``: the rule
    ``loss()`` follows to leave it a value without gradient)."""
    out: dict[int, Coefficient] = {}
    for entry in entries:
        tensor = entry.resolve() if entry.param is not None else None
        if tensor is None:
            continue
        coef = l2_coefficient(entry.regularizer)
        if coef is not None and steppable(tensor, entry.regularizer):
            out[id(tensor)] = coef
    return out


def parameters(model_or_params: Any) -> list[torch.Tensor]:
    """The parameters of a module, or the tensors of an iterable, each once, in order.

    Raises:
        TypeError: ``model_or_params`` is neither a module nor an iterable of tensors (a
            list of parameter groups included: pass the model or its parameters).
    """
    if isinstance(model_or_params, torch.nn.Module):
        items: list[Any] = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor) or not isinstance(model_or_params, Iterable):
        raise TypeError(
            "model_or_params must be an nn.Module or an iterable of tensors (its "
            f"parameters), got {type(model_or_params).__name__}"
        )
    else:
        items = list(model_or_params)
    bad = next((x for x in items if not isinstance(x, torch.Tensor)), None)
    if bad is not None:
        raise TypeError(
            "model_or_params must be an nn.Module or an iterable of tensors (its "
            f"parameters), got an iterable holding a {type(bad).__name__}"
        )
    return list({id(p): p for p in items}.values())


def _key(coef: Coefficient) -> Any:
    """Parameters share a group when their coefficient is the same schedule or number."""
    return coef if isinstance(coef, Schedule) else ("value", float(coef))


def build(
    params: Sequence[torch.Tensor],
    declared: Mapping[int, Coefficient],
    defaults: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], dict[int, tuple[torch.Tensor, Coefficient]]]:
    """The groups: one per coefficient, in the order the parameters first use it, with
    ``weight_decay = 2c`` and ``MARK = c``; then one with ``weight_decay = 0`` for the rest.
    Each also holds ``defaults``. Returns them and the decayed parameters (for the record).

    Raises:
        ValueError: ``defaults`` sets ``params``, ``weight_decay`` or ``MARK``.
    """
    taken = sorted({"params", "weight_decay", MARK} & set(defaults))
    if taken:
        raise ValueError(
            f"param_groups sets {taken[0]!r} itself (weight_decay = 2 * c on the parameters "
            f"carrying rc.l2(c), 0 elsewhere); got {taken[0]}={defaults[taken[0]]!r} among "
            "the group options. Declare the decay as rc.l2(weight_decay / 2) instead."
        )
    by_coef: dict[Any, tuple[Coefficient, list[torch.Tensor]]] = {}
    rest: list[torch.Tensor] = []
    decayed: dict[int, tuple[torch.Tensor, Coefficient]] = {}
    for p in params:
        coef = declared.get(id(p))
        if coef is None:
            rest.append(p)
            continue
        by_coef.setdefault(_key(coef), (coef, []))[1].append(p)
        decayed[id(p)] = (p, coef)
    groups = [
        {**defaults, "params": ps, "weight_decay": 2.0 * float(coef), MARK: float(coef)}
        for coef, ps in by_coef.values()
    ]
    if rest:
        groups.append({**defaults, "params": rest, "weight_decay": 0.0})
    return groups, decayed


def _same(a: Coefficient, b: Coefficient) -> bool:
    if isinstance(a, Schedule) or isinstance(b, Schedule):
        return a is b
    return float(a) == float(b)


class GroupDecay:
    """A collection's record of the parameters whose L2 penalty ``param_groups`` gave to an
    optimizer's ``weight_decay`` (weakly held), and the per-optimizer checks of the groups."""

    def __init__(self) -> None:
        self._params: dict[int, tuple[weakref.ref[torch.Tensor], Coefficient]] = {}
        self.version = 0
        # Per optimizer: (what its groups were checked for, its groups with a schedule).
        self._checked: weakref.WeakKeyDictionary[Any, tuple[Any, list[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._params)

    def add(self, decayed: Mapping[int, tuple[torch.Tensor, Coefficient]]) -> None:
        """Record ``decayed`` (``id -> (parameter, c)``): the groups apply their penalty."""
        for pid, (p, coef) in decayed.items():

            def forget(ref: Any, pid: int = pid) -> None:
                if self._params.get(pid, (None,))[0] is ref:
                    self._params.pop(pid, None)

            self._params[pid] = (weakref.ref(p, forget), coef)
        self._warned.clear()  # a new set-up: its mistakes are warned afresh
        self.version += 1

    def clear(self) -> None:
        self._params.clear()
        self._checked = weakref.WeakKeyDictionary()
        self._warned.clear()
        self.version += 1

    def recorded(self) -> set[int]:
        """Every parameter ``param_groups()`` gave to a group (its own warnings cover them)."""
        return {pid for pid, (ref, _) in list(self._params.items()) if ref() is not None}

    def ids(self, declared: Mapping[int, Coefficient]) -> set[int]:
        """The recorded parameters whose declared penalty is still the recorded ``rc.l2(c)``
        (``declared``: ``declared_l2``): those ``loss()`` gives without a gradient."""
        return {
            pid
            for pid, (ref, coef) in list(self._params.items())
            if ref() is not None and pid in declared and _same(coef, declared[pid])
        }

    def before_step(
        self,
        optimizer: torch.optim.Optimizer,
        state: Any,
        declared: Callable[[], Mapping[int, Coefficient]],
        attached: Callable[[], set[int]],
        names: Callable[[list[int]], str],
    ) -> None:
        """Before ``optimizer`` steps: set the scheduled groups' ``weight_decay`` from their
        schedule's current value; check its groups when they (or ``state``, the collection's
        registrations) changed, warning once of a forgotten or doubled penalty."""
        key = (tuple(map(id, optimizer.param_groups)), groups_key(optimizer), self.version, state)
        cached = self._checked.get(optimizer)
        if cached is None or cached[0] != key:
            cached = (key, self._check(optimizer, declared(), attached(), names))
            self._checked[optimizer] = cached
        for group, schedule in cached[1]:
            value = float(schedule)
            group["weight_decay"], group[MARK] = 2.0 * value, value

    def _check(
        self,
        optimizer: torch.optim.Optimizer,
        declared: Mapping[int, Coefficient],
        attached: set[int],
        names: Callable[[list[int]], str],
    ) -> list[tuple[dict[str, Any], Schedule]]:
        mine = self.ids(declared)
        scheduled: list[tuple[dict[str, Any], Schedule]] = []
        forgotten: list[int] = []
        doubled: list[int] = []
        removed: list[int] = []
        for group in optimizer.param_groups:
            ids = [id(p) for p in group["params"]]
            if MARK in group:
                coef = next((self._params[i][1] for i in ids if i in mine), None)
                if isinstance(coef, Schedule):
                    scheduled.append((group, coef))
                if group.get("weight_decay"):
                    # Regularized here with a gradient in loss(), and decayed by the group;
                    # or decayed by the group for a penalty since removed.
                    doubled += [i for i in ids if i in declared and i not in mine]
                    removed += [i for i in ids if i in self._params and i not in declared]
            else:
                forgotten += [i for i in ids if i in mine and i not in attached]
        name = type(optimizer).__name__
        if forgotten:
            self._warn_once(
                "forgotten",
                f"{name} steps parameters whose rc.l2 penalty rc.param_groups() handed to an "
                f"optimizer's weight_decay ({len(forgotten)}: {names(forgotten)}) in a "
                "parameter group rc.param_groups() did not make: nothing applies their penalty "
                "(rc.loss() gives it no gradient). Build the optimizer from "
                "rc.param_groups(model).",
            )
        if doubled:
            self._warn_once(
                "doubled",
                f"regularized parameters ({len(doubled)}: {names(doubled)}) are in a "
                f"parameter group of {name} made by rc.param_groups() with weight_decay > 0, "
                "but their penalty is not the one the group was made for (another collection, "
                "or a regularizer changed since): rc.loss()'s gradient and the group's decay "
                "both apply it. Call rc.param_groups() again and rebuild the optimizer.",
            )
        if removed:
            self._warn_once(
                "removed",
                f"parameters ({len(removed)}) in a parameter group of {name} made by "
                "rc.param_groups() with weight_decay > 0 no longer carry the rc.l2 penalty the "
                "group was made for (removed or replaced since): the group still decays them. "
                "Call rc.param_groups() again and rebuild the optimizer.",
            )
        return scheduled

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn of ``kind`` once per ``param_groups()`` call, at the user's ``step()`` line."""
        if kind not in self._warned:
            self._warned.add(kind)
            warn_user(message)
