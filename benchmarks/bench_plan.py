"""How often does rc.loss() build its plan, how big is the penalty's autograd graph, and what
does one call cost?

The tests pin what loss() computes; how it computes it (a plan built once and reused between
steps, tensors of one kind and coefficient evaluated as one group) is tuning, measured here.
No assertion anywhere: each row prints what was counted beside what the design expects.

    python benchmarks/bench_plan.py [--steps 100] [--repeats 30] [--threads 1]

Sections:
1. plan builds: each scenario written as a user writes the training loop, run for ``--steps``
   steps; the plans built are counted by wrapping the class loss() builds them with
   (``regcollect._collection.plans.Plan``, the one place eager plans are made).
2. autograd nodes: the nodes behind a penalty (``grad_fn.next_functions`` walked, gradient
   accumulators left out): what the backward runs, compared between two penalties that the
   grouping should make cost the same (or, for mixed dtypes, one group more).
3. time per call: ``rc.loss()`` and ``rc.get_regularization_losses()`` (``Collection.losses()``)
   for 200 entries (100 ``rc.nn.Linear(64, 64)``, kernel l2 and bias l1), forward only,
   interleaved repetitions, medians; and the plans built meanwhile (``losses()`` evaluates
   each entry alone, so it costs more than ``loss()``'s grouped evaluation).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from timing import measure  # benchmarks/timing.py, beside this script

import regcollect as rc
import regcollect._collection.plans as plans
from regcollect import schedules
from regcollect.compat import v1


@contextmanager
def counting_plans() -> Iterator[list[object]]:
    """The eager plans loss() builds inside the block, in order."""
    built: list[object] = []
    original = plans.Plan

    class Counting(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    plans.Plan = Counting  # type: ignore[misc]
    try:
        yield built
    finally:
        plans.Plan = original  # type: ignore[misc]


def autograd_nodes(tensor: torch.Tensor) -> int:
    """How many autograd nodes are behind ``tensor`` (gradient accumulators left out)."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(type(n).__name__ != "AccumulateGrad" for n in seen)


# -- 1. plan builds --------------------------------------------------------------------------


def unchanged(steps: int) -> None:
    """A model whose entries and weights' identity never change."""
    model = torch.nn.ModuleList([rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))])
    for _ in range(steps):
        rc.loss()
    del model  # kept alive until here: entries hold their module weakly


def unrelated_module_each_step(steps: int) -> None:
    """An unrelated module (a metric, a helper) built between steps."""
    model = torch.nn.ModuleList([rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))])
    for _ in range(steps):
        rc.loss()
        torch.nn.Linear(3, 3)
    del model  # kept alive until here: entries hold their module weakly


def layer_appended_halfway(steps: int) -> None:
    """A regularized layer appended to the model halfway through."""
    model = torch.nn.ModuleList([rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))])
    for step in range(steps):
        if step == steps // 2:
            model.append(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)))
        rc.loss()


def swapped_parameters(steps: int) -> None:
    """FSDP2-like: the layer's weight swapped between two Parameter objects every step."""
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))
    pair = (layer.weight, torch.nn.Parameter(layer.weight.detach() * 2))
    for step in range(steps):
        layer.weight = pair[step % 2]
        rc.loss()


def removed_then_replaced(steps: int) -> None:
    """A handle removed after a third of the steps, the weight replaced after two thirds."""
    layer = rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0))
    handle = rc.add_regularizer(layer, "bias", rc.l1(1.0))
    for step in range(steps):
        if step == steps // 3:
            handle.remove()
        if step == 2 * steps // 3:
            layer.weight = torch.nn.Parameter(torch.ones(3, 3))
        rc.loss()


def scoped_and_module_losses(steps: int) -> None:
    """``rc.loss(scope=...)`` and ``rc.loss(model)`` each step, unrelated modules built."""
    model = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    for _ in range(steps):
        rc.loss(scope="0")
        rc.loss(model)
        torch.nn.Sequential(torch.nn.Linear(2, 2))


def scheduled_l2(steps: int) -> None:
    """An l2 whose coefficient follows a schedule stepped by the optimizer."""
    layer = torch.nn.Linear(3, 2)
    sched = schedules.linear(0.0, 1.0, steps=steps)
    rc.add_regularizer(layer, "weight", rc.l2(sched))  # type: ignore[arg-type]  # l2's hint
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        (layer(torch.ones(1, 3)).sum() + rc.loss()).backward()
        opt.step()


PLAN_SCENARIOS: list[tuple[str, Callable[[int], None], str]] = [
    ("nothing changes", unchanged, "1"),
    ("unrelated module built each step", unrelated_module_each_step, "1"),
    ("regularized layer appended halfway", layer_appended_halfway, "2"),
    ("weight swapped between two Parameters", swapped_parameters, "2"),
    ("handle removed, then weight replaced", removed_then_replaced, "3"),
    ("loss(scope) and loss(model), unrelated modules", scoped_and_module_losses, "2"),
    ("scheduled l2 stepped by SGD", scheduled_l2, "1"),
]


def plan_builds(steps: int) -> None:
    print(f"\n## 1. plan builds over {steps} steps")
    print(f"{'scenario':<50} {'built':>6} {'expected':>9}")
    for name, scenario, expected in PLAN_SCENARIOS:
        rc.get_collection().clear()
        with counting_plans() as built:
            scenario(steps)
        print(f"{name:<50} {len(built):>6} {expected:>9}")
    rc.get_collection().clear()


# -- 2. autograd nodes -----------------------------------------------------------------------


def penalty_of(params: dict[str, torch.Tensor], regs: list[rc.Regularizer]) -> torch.Tensor:
    """``loss()`` of a fresh collection with ``regs[i]`` on the i-th of ``params``."""
    holder, coll = torch.nn.Module(), rc.Collection()
    for (name, p), reg in zip(params.items(), regs):
        holder.register_parameter(name, torch.nn.Parameter(p.detach().clone()))
        rc.add_regularizer(holder, name, reg, collection=coll)
    return coll.loss()


def square_weights(n: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(2, 2, dtype=dtype) for i in range(n)}


Weights = dict[str, torch.Tensor]
Row = tuple[str, Weights, list[rc.Regularizer], str, Weights, list[rc.Regularizer], str]


def node_rows() -> list[Row]:
    """``(name, weights, regularizers, against, weights, regularizers, expected)``: two
    penalties whose node counts are compared, and how they should compare."""
    conv = {f"c{i}": torch.randn(6, 4, 3, 3) for i in range(3)}
    lasso = rc.GroupLasso(0.05)
    w, w64 = {"w": torch.randn(2, 3)}, {"w": torch.randn(64, 64)}
    # sum_regularizer gives None only for an empty list
    summed = cast(rc.Regularizer, v1.sum_regularizer([v1.l1_regularizer(0.1), None, rc.l2(0.1)]))
    sixty = cast(rc.Regularizer, v1.sum_regularizer([rc.l2(0.01)] * 60))
    l2: rc.Regularizer = rc.l2(0.1)
    l2b: rc.Regularizer = rc.l2(0.2)
    l1: rc.Regularizer = rc.l1(0.1)
    one, two, four, five = (square_weights(n) for n in (1, 2, 4, 5))
    mixed = {"w16": torch.full((10, 10), 3.0, dtype=torch.float16), "w32": torch.ones(4)}
    single = {"a": torch.full((10, 10), 3.0), "b": torch.ones(4)}
    return [
        ("3 x GroupLasso, one shape", conv, [lasso] * 3, "1 x GroupLasso",
         {"c0": conv["c0"]}, [lasso], "equal"),
        ("v1.sum_regularizer([l1, None, l2])", w, [summed], "l1_l2", w,
         [rc.l1_l2(0.1, 0.1)], "equal"),
        ("v1.sum_regularizer([l2(0.01)] * 60)", w64, [sixty], "l2(0.6)", w64, [rc.l2(0.6)],
         "equal"),
        ("5 x l2(0.1)", five, [l2] * 5, "1 x l2(0.1)", one, [l2], "equal"),
        ("3 x l2(0.1) + l2(0.2)", four, [l2] * 3 + [l2b], "l2(0.1) + l2(0.2)", two,
         [l2, l2b], "equal"),
        ("3 x l2(0.1) + l1(0.1)", four, [l2] * 3 + [l1], "l2(0.1) + l1(0.1)", two, [l2, l1],
         "equal"),
        ("l2(0.1) + l2(0.2)", two, [l2, l2b], "1 x l2(0.1)", one, [l2], "more"),
        ("float16 + float32, l2", mixed, [rc.l2(1.0)] * 2, "float32 + float32", single,
         [rc.l2(1.0)] * 2, "more"),
    ]  # fmt: skip


def node_counts() -> None:
    print("\n## 2. autograd nodes behind the penalty")
    print(f"{'penalty':<38} {'nodes':>5}   {'against':<22} {'nodes':>5}   expected")
    for name, weights, regs, against, other, other_regs, expected in node_rows():
        a = autograd_nodes(penalty_of(weights, regs))
        b = autograd_nodes(penalty_of(other, other_regs))
        print(f"{name:<38} {a:>5}   {against:<22} {b:>5}   {expected}")


# -- 3. time per call ------------------------------------------------------------------------


def call_times(repeats: int) -> None:
    rc.get_collection().clear()
    layers = torch.nn.ModuleList(
        rc.nn.Linear(64, 64, kernel_regularizer=rc.l2(1e-3), bias_regularizer=rc.l1(1e-4))
        for _ in range(100)
    )
    entries = len(rc.get_collection())
    inner = 20
    with counting_plans() as built:
        medians = measure(
            {"rc.loss()": rc.loss, "rc.get_regularization_losses()": rc.get_regularization_losses},
            repeats,
            inner,
        )
    calls = 2 * (3 + repeats * inner)
    print(f"\n## 3. time per call, {entries} entries ({len(layers)} x rc.nn.Linear(64, 64))")
    for name, seconds in medians.items():
        print(f"{name:<34} {seconds * 1e6:9.1f} us")
    print(
        f"plans built over those {calls} calls: {len(built)} "
        "(expected: 1, the two calls share the plan of their scope)"
    )
    rc.get_collection().clear()


def main() -> None:
    parser = argparse.ArgumentParser(description="rc.loss() plan builds, graph size, call time")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, "
        f"steps {args.steps}, repeats {args.repeats} (medians)"
    )
    plan_builds(args.steps)
    node_counts()
    call_times(args.repeats)


if __name__ == "__main__":
    main()
