"""Multi-process checks, run by ``test_distributed.py`` as ``torchrun --nproc_per_node=2``.

Every scenario trains a small regularized MLP for 4 SGD steps, each rank on its half of the
batch, and the same model in this process alone on the whole batch (the reference). It writes,
per scenario, the largest differences to the reference (parameters, per-step penalties,
``penalties()`` values), what every rank saw, and which collectives one ``loss()`` ran. The
pytest side asserts on that report, so a failure names the scenario and the number.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import ShardingStrategy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import regcollect as rc
import regcollect._collection.plans
import regcollect._engine.plan

STEPS, BATCH, LR = 4, 8, 0.1
Wrap = Callable[[torch.nn.Module], torch.nn.Module]


class ThreeTerms(rc.Regularizer):
    """``a * sum|x| + b * sum(x**2) + c * sum|x|``: three elementwise parts, two of one
    exponent, with a kernel defined here (a custom penalty made of the built-in terms)."""

    def __init__(self, a: float = 1e-3, b: float = 1e-2, c: float = 2e-3) -> None:
        self.a, self.b, self.c = a, b, c

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x.abs().sum() + self.b * (x * x).sum() + self.c * x.abs().sum()

    def get_config(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "c": self.c}


def _three_terms_kernel() -> None:
    from regcollect._penalties.kernel import Kernel, kernel_of, register_kernel

    l1 = kernel_of(rc.l1(1.0)).terms(rc.l1(1.0))[0][0]
    l2 = kernel_of(rc.l2(1.0)).terms(rc.l2(1.0))[0][0]

    class ThreeKernel(Kernel):
        def terms(self, reg: Any) -> tuple[Any, ...]:
            return ((l1, reg.a), (l2, reg.b), (l1, reg.c))

    register_kernel(ThreeTerms, ThreeKernel())


_three_terms_kernel()


def build(coll: rc.Collection | None, *, middle: str = "l1_l2", side: bool = False) -> Any:
    """The test MLP. ``coll=None`` builds plain torch layers (for ``rc.regularize``).

    The last layer has one output, so on 2 ranks its weight and bias have an empty shard.
    ``middle`` picks the middle kernel's regularizer; ``side`` adds a layer the forward never
    uses, whose parameters get gradients from the penalty only.
    """
    torch.manual_seed(0)
    regs: dict[str, Any] = {
        "l1_l2": rc.l1_l2(l1=1e-3, l2=1e-2),
        "three_terms": ThreeTerms(),
        "orthogonal": rc.orthogonal(0.5),
        "custom": rc.regularizers.get(lambda w: 0.05 * (w.sum(dim=1) ** 2).sum()),
        "l2sp": rc.L2SP(0.5),
        "group_lasso": rc.GroupLasso(0.05),
    }

    def linear(n_in: int, n_out: int, **kwargs: Any) -> torch.nn.Module:
        if coll is None:
            return torch.nn.Linear(n_in, n_out)
        return rc.nn.Linear(n_in, n_out, collection=coll, **kwargs)

    body = torch.nn.Sequential(
        linear(6, 12, kernel_regularizer=rc.l2(0.05), bias_regularizer=rc.l1(0.01)),
        torch.nn.Tanh(),
        linear(12, 9, kernel_regularizer=regs[middle], bias_regularizer=rc.l2(0.02)),
        torch.nn.Tanh(),
        linear(9, 1, kernel_regularizer=rc.l1_l2(l1=0.002, l2=0.03), bias_regularizer=rc.l2(0.1)),
    )
    if side:
        return WithSide(body, linear(5, 7, kernel_regularizer=rc.l2(0.1), bias_regularizer="l1"))
    return body


class WithSide(torch.nn.Module):
    def __init__(self, body: torch.nn.Module, side: torch.nn.Module) -> None:
        super().__init__()
        self.body, self.side = body, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PenaltyInForward(torch.nn.Module):
    """Returns ``(output, coll.loss())``, so DDP's unused-parameter search sees the penalty."""

    def __init__(self, model: torch.nn.Module, coll: rc.Collection) -> None:
        super().__init__()
        self.model, self.coll = model, coll

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x), self.coll.loss()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def train(
    model: torch.nn.Module,
    coll: rc.Collection,
    x: torch.Tensor,
    y: torch.Tensor,
    compiled: bool = False,
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = torch.compile(coll.loss, backend="eager") if compiled else coll.loss
    seen = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(x)
        out, penalty = out if isinstance(out, tuple) else (out, loss())
        (torch.nn.functional.mse_loss(out, y) + penalty).backward()
        opt.step()
        seen.append(penalty.item())
    return seen


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, FSDP1):  # its parameters are views of this rank's shard
        with FSDP1.summon_full_params(model):
            return {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in model.named_parameters()
            }
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.").removeprefix("model.")
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def everyone(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def count_collectives(coll: rc.Collection) -> dict[str, int]:
    with CommDebugMode() as comm:  # sees c10d and functional collectives alike
        coll.loss()
    return {str(op).split(".")[-2]: n for op, n in comm.get_comm_counts().items()}


def compare(
    wrap: Wrap,
    *,
    regularize: bool = False,
    in_forward: bool = False,
    stacked: bool = False,
    compiled: bool = False,
    **build_kwargs: Any,
) -> dict[str, Any]:
    """Train the wrapped model on this rank's half batch and the reference on the whole batch.

    ``regularize``: build plain torch layers and call ``rc.regularize`` after wrapping.
    ``in_forward``: compute the penalty inside the wrapped forward (:class:`PenaltyInForward`).
    ``stacked``: the wrapped model's plain CPU tensors go through the engine's stacked path
    (every group stacks, however few its tensors); the reference keeps the foreach path.
    ``compiled``: ``coll.loss`` under ``torch.compile`` in the wrapped model's training.
    """
    default_min = regcollect._engine.plan._STACK_MIN
    try:
        if stacked:
            regcollect._engine.plan._STACK_MIN = 1
        return _compare(wrap, regularize, in_forward, compiled, build_kwargs)
    finally:
        regcollect._engine.plan._STACK_MIN = default_min


def _compare(
    wrap: Wrap, regularize: bool, in_forward: bool, compiled: bool, build_kwargs: dict[str, Any]
) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    rules = {"kernel": rc.l2(0.05), "bias": rc.l1(0.01)}

    stack_min, regcollect._engine.plan._STACK_MIN = regcollect._engine.plan._STACK_MIN, sys.maxsize
    ref_coll = rc.Collection()
    ref = build(None if regularize else ref_coll, **build_kwargs)
    if regularize:
        rc.regularize(ref, collection=ref_coll, **rules)
    initial = full_state(ref)
    ref_seen = train(ref, ref_coll, x, y)
    ref_pen = ref_coll.penalties()
    regcollect._engine.plan._STACK_MIN = stack_min

    coll = rc.Collection()
    model = build(None if regularize else coll, **build_kwargs)
    model = wrap(PenaltyInForward(model, coll) if in_forward else model)
    if regularize:
        rc.regularize(model, collection=coll, **rules)
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    used: list[Any] = []
    original = regcollect._collection.plans.Plan

    class Recording(original):  # type: ignore[misc, valid-type]
        def __call__(self) -> Any:
            used.append(self)
            return super().__call__()

    regcollect._collection.plans.Plan = Recording
    try:
        seen = train(model, coll, x[half], y[half], compiled)
    finally:
        regcollect._collection.plans.Plan = original
    # The plan the last loss() used, right after a forward pass.
    stacked_groups = sum(g.stacked for g in used[-1].groups) if used else 0
    # PenaltyInForward adds "model." to the names; nothing else may change them.
    pen = {k.removeprefix("model."): v for k, v in coll.penalties().items()}
    summary = io.StringIO()
    coll.summary(file=summary)

    # One loss() right after a forward pass (FSDP2's root keeps its parameters unsharded
    # then) and one after a backward pass (everything sharded).
    out = model(x[half])
    counts = [count_collectives(coll)]
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    counts.append(count_collectives(coll))

    got, want = full_state(model), full_state(ref)
    if got.keys() != want.keys():
        raise AssertionError(f"parameters differ: {sorted(got)} vs {sorted(want)}")
    return {
        "param_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
        "moved": max(float((want[k] - initial[k]).abs().max()) for k in want),
        "penalty_diff": max(abs(a - b) for a, b in zip(seen, ref_seen)),
        "penalties_diff": max(abs(pen[k] - ref_pen[k]) for k in ref_pen),
        "names": sorted(pen),
        "reference_names": sorted(ref_pen),
        # Entry shapes: the model's, whatever the engine made of the parameters.
        "shapes": {e.name.removeprefix("model."): e.shape for e in coll.entries()},
        "reference_shapes": {e.name: e.shape for e in ref_coll.entries()},
        "collectives": counts,
        "stacked_groups": stacked_groups,
        "seen_by_rank": everyone(seen),
        "penalties_by_rank": everyone(pen),
        "summary_by_rank": everyone(summary.getvalue()),
    }


def cpu_mesh() -> Any:
    """The ranks' CPU mesh: without one, ``fully_shard`` picks CUDA wherever a GPU exists."""
    return init_device_mesh("cpu", (dist.get_world_size(),))


def root_only(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` on the root alone."""
    fully_shard(model, mesh=cpu_mesh())
    return model


def fsdp(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``fully_shard`` on every layer with parameters, then on the root (the usual recipe)."""
    kwargs.setdefault("mesh", cpu_mesh())
    for layer in model.modules():
        if layer is not model and any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def fsdp1(model: torch.nn.Module, nested: bool = False, **kwargs: Any) -> torch.nn.Module:
    """FSDP1 with ``use_orig_params=True`` (unless said otherwise), on the root or on every
    ``Linear`` too (``nested``)."""
    kwargs.setdefault("use_orig_params", True)
    if nested:
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({torch.nn.Linear})
    return FSDP1(model, device_id=torch.device("cpu"), **kwargs)


def fsdp1_refused(middle: str = "l1_l2", use_orig_params: bool = True) -> dict[str, Any]:
    """What FSDP1 cannot give exactly is refused on every rank: a whole-tensor penalty on its
    flattened shards or flat parameters, an optimizer holding its flat parameters
    (``use_orig_params=False``)."""
    coll = rc.Collection()
    inner = build(coll, middle=middle)
    model = fsdp1(inner, use_orig_params=use_orig_params)
    errors = []
    for attempt in (
        coll.loss,
        lambda: rc.attach_optimizer(torch.optim.SGD(model.parameters(), lr=LR), collection=coll),
        # A whole-tensor penalty registered after wrapping: refused at once.
        lambda: rc.add_regularizer(inner[0], "weight", rc.orthogonal(0.1), collection=coll),
    ):
        try:
            attempt()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return {"errors_by_rank": everyone(errors)}


def fsdp1_loss_first() -> dict[str, Any]:
    """``loss()`` before the forward pass with FSDP1 flat parameters: the penalty's gradient
    would come after FSDP1 reduced the flat parameter's, which must be an error from the
    backward, on every rank."""
    coll = rc.Collection()
    model = fsdp1(build(coll), use_orig_params=False)
    x, y = data()
    rank = dist.get_rank()
    penalty = coll.loss()
    error = None
    try:
        (torch.nn.functional.mse_loss(model(x[rank::2]), y[rank::2]) + penalty).backward()
    except RuntimeError as exc:
        error = str(exc)
    # The next step, in the right order, is exact again: nothing was carried over.
    for p in model.parameters():
        p.grad = None
    out = model(x[rank::2])
    (torch.nn.functional.mse_loss(out, y[rank::2]) + coll.loss()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reference_coll = rc.Collection()
    reference = build(reference_coll)
    reference_grads = []
    for r in range(dist.get_world_size()):
        reference.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(x[r::2]), y[r::2])
        (loss + reference_coll.loss()).backward()
        reference_grads.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    want = torch.stack(reference_grads).mean(0)
    flat = next(iter(grads.values()))
    shard = flat.numel()
    mine = want[rank * shard : (rank + 1) * shard]
    return {
        "errors_by_rank": everyone(error),
        "next_step_grad_diff": float((flat[: mine.numel()] - mine).abs().max()),
    }


def fsdp1_flat_frozen_later() -> dict[str, Any]:
    """A wrapped layer frozen after the first loss() (FSDP1 with use_orig_params=False freezes a
    whole flat parameter): its penalty leaves the value, as in one process, and comes back
    when it is unfrozen."""
    coll = rc.Collection()
    model = fsdp1(build(coll), nested=True, use_orig_params=False)
    reference_coll = rc.Collection()
    reference = build(reference_coll)
    values = [coll.loss().item()]
    want = [reference_coll.loss().item()]
    # On one rank only: an error on every rank, not a hang.
    for p in model.module[2].parameters():
        p.requires_grad_(dist.get_rank() != 1)
    error = None
    try:
        coll.loss()
    except RuntimeError as exc:
        error = str(exc)
    for frozen in (True, False):
        for p in model.module[2].parameters():  # the FSDP1 unit of layer 2: its flat parameter
            p.requires_grad_(not frozen)
        for p in reference[2].parameters():
            p.requires_grad_(not frozen)
        values.append(coll.loss().item())
        want.append(reference_coll.loss().item())
    return {"values": values, "want": want, "errors_by_rank": everyone(error)}


def fsdp1_hybrid(model: torch.nn.Module, replicas: int) -> torch.nn.Module:
    """FSDP1 ``HYBRID_SHARD`` with flat parameters on a (replicas, shards) mesh of the ranks."""
    shape = (replicas, dist.get_world_size() // replicas)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    return fsdp1(
        model,
        use_orig_params=False,
        sharding_strategy=ShardingStrategy.HYBRID_SHARD,
        device_mesh=mesh,
    )


def hsdp(model: torch.nn.Module) -> torch.nn.Module:
    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("rep", "shard"))
    return fsdp(model, mesh=mesh)


def ddp_find_unused(model: torch.nn.Module) -> torch.nn.Module:
    return DDP(model, find_unused_parameters=True)


def ddp_static(model: torch.nn.Module) -> torch.nn.Module:
    return DDP(model, static_graph=True)


def replicated_beside_plain() -> dict[str, Any]:
    """A replicated DTensor and a plain tensor with the same kind, coefficient and dtype."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from regcollect._engine.plan import Plan

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    plain = torch.randn(4, 3, requires_grad=True)
    full = torch.randn(5, 2)
    replicated = distribute_tensor(full, mesh, [Replicate()]).requires_grad_(True)
    result = Plan([plain, replicated], [rc.l2(0.3), rc.l2(0.3)])()
    result.total.backward()
    want = 0.3 * (plain.detach() ** 2).sum() + 0.3 * (full**2).sum()
    return {
        "value_diff": abs(result.total.item() - want.item()),
        "plain_grad_diff": float((plain.grad - 0.6 * plain.detach()).abs().max()),
        "replicated_grad_diff": float((replicated.grad.to_local() - 0.6 * full).abs().max()),
    }


def attached(
    wrap: Wrap, decoupled: bool, after_forward: bool = False, middle: str = "l1_l2"
) -> dict[str, Any]:
    """rc.attach_optimizer: the step applies the L1/L2 terms; the wrapped model on this rank's
    half batch must match the same mode in one process on the whole batch. ``after_forward``:
    ``rc.loss()`` after the forward pass, when FSDP2's root holds its unsharded parameters."""

    def run(model: torch.nn.Module, coll: rc.Collection, x: torch.Tensor, y: torch.Tensor) -> Any:
        opt = (
            torch.optim.Adam(model.parameters(), lr=0.01)
            if decoupled
            else torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        )
        rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
        seen = []
        for _ in range(STEPS):
            opt.zero_grad()
            out = model(x) if after_forward else None
            penalty = coll.loss()
            out = model(x) if out is None else out
            (torch.nn.functional.mse_loss(out, y) + penalty).backward()
            opt.step()
            seen.append(penalty.item())
        return seen

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    ref_coll = rc.Collection()
    ref = build(ref_coll, middle=middle)
    initial = full_state(ref)
    ref_seen = run(ref, ref_coll, x, y)
    coll = rc.Collection()
    model = wrap(build(coll, middle=middle))
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    try:
        seen = run(model, coll, x[half], y[half])
    except ValueError as exc:  # refused: the same error on every rank
        return {"errors_by_rank": everyone(str(exc))}
    got, want = full_state(model), full_state(ref)
    return {
        "param_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
        "moved": max(float((want[k] - initial[k]).abs().max()) for k in want),
        "penalty_diff": max(abs(a - b) for a, b in zip(seen, ref_seen)),
    }


def frozen(where: str, middle: str = "l1_l2") -> dict[str, Any]:
    """``2.weight`` frozen on rank 1 only (``where="one"``) or on every rank (``"every"``):
    what ``loss()`` does, on each rank, then once it is unfrozen again."""
    coll = rc.Collection()
    model = fsdp(build(coll, middle=middle))
    reference_coll = rc.Collection()
    reference = build(reference_coll, middle=middle)
    if where == "every" or dist.get_rank() == 1:
        model[2].weight.requires_grad_(False)
    reference[2].weight.requires_grad_(where != "every")
    want = reference_coll.loss().item()
    error = None
    value = None
    try:
        value = coll.loss().item()
    except RuntimeError as exc:
        error = str(exc)
    model[2].weight.requires_grad_(True)  # every rank the same again: back to normal
    after = coll.loss().item()
    reference[2].weight.requires_grad_(True)
    return {
        "errors_by_rank": everyone(error),
        "value_diff": None if value is None else abs(value - want),
        "after_diff": abs(after - reference_coll.loss().item()),
    }


def zero_redundancy_schedule() -> dict[str, Any]:
    """``ZeroRedundancyOptimizer`` over SGD (it steps the SGD it keeps as ``.optim``) with a
    warm-up coefficient: the schedule advances once per step, and the weights equal one
    process's plain SGD with the same schedule."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def run(model: torch.nn.Module, opt: Any, coll: rc.Collection, x: Any, y: Any) -> Any:
        for _ in range(STEPS):
            opt.zero_grad()
            (torch.nn.functional.mse_loss(model(x), y) + coll.loss()).backward()
            opt.step()

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for name in ("reference", "zero"):
        coll, schedule = rc.Collection(), rc.schedules.warmup(0.2, steps=STEPS)
        model = build(None)
        rc.regularize(model, kernel=rc.l2(schedule), bias=rc.l1(schedule), collection=coll)
        if name == "reference":
            run(model, torch.optim.SGD(model.parameters(), lr=LR), coll, x, y)
        else:
            model = DDP(model)
            opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, lr=LR)
            run(model, opt, coll, x[half], y[half])
        results[name] = (schedule.step, full_state(model))
    (ref_step, want), (step, got) = results["reference"], results["zero"]
    return {
        "steps_by_rank": everyone(step),
        "reference_step": ref_step,
        "param_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
    }


class TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass with a ``__torch_function__`` of its own (its values all here)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return super().__torch_function__(func, types, args, kwargs or {})


class PartOfRows(torch.Tensor):
    """A sharded tensor nobody taught regcollect about: a wrapper subclass holding some rows."""

    @staticmethod
    def __new__(cls, local: torch.Tensor, rows: int) -> Any:
        out = torch.Tensor._make_wrapper_subclass(
            cls, (rows, *local.shape[1:]), dtype=local.dtype, requires_grad=local.requires_grad
        )
        out.local = local
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.detach.default:
            return PartOfRows(args[0].local.detach(), args[0].shape[0])
        unwrap = lambda x: x.local if isinstance(x, PartOfRows) else x  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        return func(*args, **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


def unknown_sharded_refused() -> dict[str, Any]:
    """A parameter of an unknown sharded-tensor class: refused by name on every rank (one
    process holding the rows it holds would give a per-rank penalty)."""
    coll = rc.Collection()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].weight = torch.nn.Parameter(PartOfRows(torch.randn(2, 4), 4))
    rc.regularize(model, kernel=rc.l2(0.1), bias=None, collection=coll)
    try:
        coll.loss()
    except ValueError as exc:
        return {"error_text": str(exc)}
    return {"error_text": None}


def ddp_join(regcollect_penalty: bool, tagged: bool = False) -> dict[str, Any]:
    """DDP under ``Join`` with uneven inputs (rank 0: 3 batches, rank 1: 2): the rank that ran
    out shadows the last step's all-reduce with zeros. ``rc.l2(wd / 2)`` in the loss against
    ``SGD(weight_decay=wd)`` (applied in each rank's step, never averaged). ``tagged``: the
    weights are a Parameter subclass with a ``__torch_function__`` of its own."""
    from torch.distributed.algorithms.join import Join

    wd = 0.5
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(2 + rank)
    batches = [
        (torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g))
        for _ in range(3 if rank == 0 else 2)
    ]
    coll = rc.Collection()
    model = build(None)
    if tagged:
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight = TaggedParameter(layer.weight.detach().clone())
    if regcollect_penalty:
        rc.regularize(model, kernel=rc.l2(wd / 2), bias=rc.l2(wd / 2), collection=coll)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, weight_decay=0.0 if regcollect_penalty else wd)
    with Join([ddp]):
        for x, y in batches:
            opt.zero_grad()
            out = ddp(x)
            loss = torch.nn.functional.mse_loss(out, y)
            if regcollect_penalty:
                loss = loss + coll.loss()
            loss.backward()
            opt.step()
    return {"params": {k: v.tolist() for k, v in full_state(ddp).items()}}


def ddp_join_against_weight_decay(tagged: bool = False) -> dict[str, Any]:
    ours = ddp_join(True, tagged)["params"]
    want = ddp_join(False, tagged)["params"]
    diff = max(float((torch.tensor(ours[k]) - torch.tensor(want[k])).abs().max()) for k in want)
    return {"param_diff": diff}


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "replicated_beside_plain": replicated_beside_plain,
    "zero_redundancy_schedule": zero_redundancy_schedule,
    "ddp_join": ddp_join_against_weight_decay,
    "ddp_join_tagged": lambda: ddp_join_against_weight_decay(tagged=True),
    "unknown_sharded_refused": unknown_sharded_refused,
    "ddp": lambda: compare(DDP),
    "ddp_find_unused": lambda: compare(ddp_find_unused),
    "ddp_penalty_only_param": lambda: compare(DDP, side=True),
    "ddp_static_graph_penalty_only_param": lambda: compare(ddp_static, side=True),
    "ddp_find_unused_penalty_only_param_in_forward": lambda: compare(
        ddp_find_unused, side=True, in_forward=True
    ),
    # DDP's own limit, kept here so a PyTorch change in either direction is noticed.
    "ddp_find_unused_penalty_only_param": lambda: compare(ddp_find_unused, side=True),
    "ddp_regularize_after_wrap": lambda: compare(DDP, regularize=True),
    "fsdp2": lambda: compare(fsdp),
    "fsdp2_root_only": lambda: compare(root_only),
    "fsdp2_orthogonal": lambda: compare(fsdp, middle="orthogonal"),
    "fsdp2_custom": lambda: compare(fsdp, middle="custom"),
    # Completed by elementwise part, whatever their exponents: three slots, not one per p.
    "fsdp2_three_terms": lambda: compare(fsdp, middle="three_terms"),
    "ddp_l2sp": lambda: compare(DDP, middle="l2sp"),
    "fsdp2_l2sp": lambda: compare(fsdp, middle="l2sp"),
    "ddp_group_lasso": lambda: compare(DDP, middle="group_lasso"),
    "fsdp2_group_lasso": lambda: compare(fsdp, middle="group_lasso"),
    "fsdp2_penalty_only_param": lambda: compare(fsdp, side=True),
    "fsdp2_regularize_after_shard": lambda: compare(fsdp, regularize=True),
    "hsdp_2d_mesh": lambda: compare(hsdp),
    # The stacked small-tensor path: its gradients are views of one tensor.
    "ddp_stacked": lambda: compare(DDP, stacked=True),
    # The optimizer-step mode (rc.attach_optimizer), coupled and decoupled (proximal L1).
    "ddp_attached": lambda: attached(DDP, decoupled=False),
    "ddp_attached_decoupled": lambda: attached(DDP, decoupled=True),
    "fsdp2_attached": lambda: attached(fsdp, decoupled=False),
    "fsdp2_attached_decoupled": lambda: attached(fsdp, decoupled=True),
    # The root's unsharded parameters in loss(): the step applies their penalty (it was
    # counted twice: 0.03 off).
    "fsdp2_root_only_attached_after_forward": lambda: attached(
        root_only, decoupled=False, after_forward=True
    ),
    "fsdp2_root_only_attached_decoupled_after_forward": lambda: attached(
        root_only, decoupled=True, after_forward=True
    ),
    # The group lasso's rows are whole on each rank (Shard(0)): its proximal step applies;
    # L2-SP's reference is no DTensor: decoupled, it is refused by name.
    "fsdp2_group_lasso_attached_decoupled": lambda: attached(
        fsdp, decoupled=True, middle="group_lasso"
    ),
    "fsdp2_l2sp_attached_decoupled": lambda: attached(fsdp, decoupled=True, middle="l2sp"),
    # Ranks that disagree on what they train: an error on every rank, not a hang.
    "fsdp2_frozen_on_one_rank": lambda: frozen("one"),
    "fsdp2_orthogonal_frozen_on_one_rank": lambda: frozen("one", middle="orthogonal"),
    "fsdp2_frozen_on_every_rank": lambda: frozen("every"),
    "fsdp2_root_only_stacked": lambda: compare(root_only, stacked=True),
    "fsdp1": lambda: compare(fsdp1),
    "fsdp1_nested": lambda: compare(lambda m: fsdp1(m, nested=True)),
    "fsdp1_shard_grad_op": lambda: compare(
        lambda m: fsdp1(m, sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)
    ),
    "fsdp1_no_shard": lambda: compare(
        lambda m: fsdp1(m, sharding_strategy=ShardingStrategy.NO_SHARD)
    ),
    "fsdp1_regularize_after_wrap": lambda: compare(fsdp1, regularize=True),
    "fsdp1_attached": lambda: attached(fsdp1, decoupled=False),
    "fsdp1_attached_decoupled": lambda: attached(lambda m: fsdp1(m, nested=True), decoupled=True),
    # use_orig_params=False: one flat parameter per wrapped module.
    "fsdp1_flat": lambda: compare(lambda m: fsdp1(m, use_orig_params=False)),
    "fsdp1_flat_nested": lambda: compare(lambda m: fsdp1(m, nested=True, use_orig_params=False)),
    "fsdp1_flat_shard_grad_op": lambda: compare(
        lambda m: fsdp1(m, sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=False)
    ),
    "fsdp1_flat_no_shard": lambda: compare(
        lambda m: fsdp1(m, sharding_strategy=ShardingStrategy.NO_SHARD, use_orig_params=False)
    ),
    "fsdp1_flat_regularize_after_wrap": lambda: compare(
        lambda m: fsdp1(m, use_orig_params=False), regularize=True
    ),
    "fsdp1_flat_parameters": lambda: fsdp1_refused(use_orig_params=False),
    "fsdp1_flat_orthogonal": lambda: fsdp1_refused(middle="orthogonal", use_orig_params=False),
    "fsdp1_flat_loss_first": fsdp1_loss_first,
    # HYBRID_SHARD on a (1 replica, 2 shards) mesh. With 2 replicas of 1 shard, FSDP1 itself
    # does not average the replicas' gradients here (the data loss's alone differ by 0.19-1.1
    # from one process's, regcollect or not), so that mesh is not a reference.
    "fsdp1_flat_hybrid": lambda: compare(lambda m: fsdp1_hybrid(m, 1)),
    "fsdp1_flat_frozen_later": fsdp1_flat_frozen_later,
    # loss() under torch.compile: the eager loss() runs for parameters held in parts.
    "fsdp1_compiled": lambda: compare(fsdp1, compiled=True),
    "fsdp1_flat_compiled": lambda: compare(
        lambda m: fsdp1(m, use_orig_params=False), compiled=True
    ),
    "fsdp1_orthogonal": lambda: fsdp1_refused(middle="orthogonal"),
}


def main(
    path: str, names: list[str], table: dict[str, Callable[[], dict[str, Any]]] | None = None
) -> None:
    """Run the scenarios ``names`` (all when empty) of ``table`` (default: this file's) and
    write rank 0's report to ``path``; ``tp_worker.py`` runs its own table through this."""
    table = SCENARIOS if table is None else table
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    report: dict[str, Any] = {}
    for name in names or table:
        try:
            report[name] = table[name]()
        except Exception:
            report[name] = {"error": traceback.format_exc()}
        dist.barrier()
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # With gloo, a process that has imported numpy sometimes aborts while the interpreter
    # shuts down ("terminate called without an active exception"), after all work is done.
    # The report is written; skip the teardown so that PyTorch issue cannot fail the suite.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
