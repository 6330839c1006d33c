"""rc.param_groups: the optimizer's own weight_decay on exactly the declared L2 tensors; and
optimizers whose step() differentiates the gradients (Hessian-based) under attach_optimizer."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import regcollect as rc
from regcollect.schedules import linear

C = 0.025  # rc.l2(C): weight_decay = 2 * C = 0.05
STEPS = 6
MOMENTUM = 0.9  # the bound's factor for a running average (see tests/test_optim.py)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def kernels(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def others(model):
    return [p for p in model.parameters() if p.dim() < 2]


def hand_made(model, wd=2 * C):
    """What a user writes by hand: the kernels decay, the rest does not."""
    return [
        {"params": kernels(model), "weight_decay": wd},
        {"params": others(model), "weight_decay": 0.0},
    ]


def train(model, opt, data, extra=None, create_graph=False):
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward(create_graph=create_graph)
        opt.step()


def regularized(seed=0):
    model = mlp(seed)
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l2(C), collection=coll)
    return model, coll


# -- optimizer families: each builds from a list of groups; a missing package skips it ------


class HessianStep(torch.optim.Optimizer):
    """A Hessian-based optimizer as AdaHessian and Sophia are: step() takes a Hessian-vector
    product through the graph of the gradients (backward(create_graph=True)), which saved
    the weights, then applies AdamW's decoupled decay and ``grad / (|v * Hv| + eps)``."""

    def __init__(self, params, lr=0.05, weight_decay=0.0, eps=0.1):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        # One fixed probe per tensor (of its shape only): the same in any parameter order.
        vs = [((torch.arange(p.numel()) % 3 == 0).to(p.dtype) * 2 - 1).view_as(p) for p in params]
        hvs = torch.autograd.grad([p.grad for p in params], params, grad_outputs=vs)
        curvature = {id(p): (hv * v).abs() for p, hv, v in zip(params, hvs, vs)}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.sub_(group["lr"] * p.grad / (curvature[id(p)] + group["eps"]))


def _po(name, **kw):
    def make(groups):
        po = pytest.importorskip("pytorch_optimizer")
        return getattr(po, name)(groups, **kw)

    return make


def _timm(name, **kw):
    def make(groups):
        optim = pytest.importorskip("timm.optim")
        return getattr(optim, name)(groups, **kw)

    return make


_O = torch.optim
# name (as the docs table writes it) -> (make(groups), whether the step differentiates the
# gradients: backward(create_graph=True)).
FAMILIES = {
    "torch.optim.SGD": (lambda g: _O.SGD(g, lr=0.1), False),
    "torch.optim.SGD(momentum=0.9)": (lambda g: _O.SGD(g, lr=0.1, momentum=0.9), False),
    "torch.optim.SGD(nesterov=True)": (
        lambda g: _O.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
        False,
    ),
    "torch.optim.Adam": (lambda g: _O.Adam(g, lr=0.01), False),
    "torch.optim.AdamW": (lambda g: _O.AdamW(g, lr=0.01), False),
    "torch.optim.NAdam": (lambda g: _O.NAdam(g, lr=0.01), False),
    "torch.optim.NAdam(decoupled_weight_decay=True)": (
        lambda g: _O.NAdam(g, lr=0.01, decoupled_weight_decay=True),
        False,
    ),
    "torch.optim.RAdam": (lambda g: _O.RAdam(g, lr=0.01), False),
    "torch.optim.RAdam(decoupled_weight_decay=True)": (
        lambda g: _O.RAdam(g, lr=0.01, decoupled_weight_decay=True),
        False,
    ),
    "torch.optim.RMSprop": (lambda g: _O.RMSprop(g, lr=0.01), False),
    "torch.optim.Adagrad": (lambda g: _O.Adagrad(g, lr=0.05), False),
    "torch.optim.Adamax": (lambda g: _O.Adamax(g, lr=0.01), False),
    "torch.optim.Adadelta": (lambda g: _O.Adadelta(g, lr=1.0), False),
    "torch.optim.ASGD": (lambda g: _O.ASGD(g, lr=0.01), False),
    "HessianStep (tests/test_groups.py)": (lambda g: HessianStep(g), True),
    "pytorch_optimizer.Lamb": (_po("Lamb", lr=0.01), False),
    "pytorch_optimizer.Lion": (_po("Lion", lr=1e-3), False),
    "pytorch_optimizer.Prodigy": (_po("Prodigy", lr=1.0), False),
    "pytorch_optimizer.ScheduleFreeAdamW": (_po("ScheduleFreeAdamW", lr=0.01), False),
    "pytorch_optimizer.ADOPT": (_po("ADOPT", lr=0.01), False),
    "pytorch_optimizer.MADGRAD": (_po("MADGRAD", lr=0.01), False),
    "pytorch_optimizer.MADGRAD(weight_decouple=True)": (
        _po("MADGRAD", lr=0.01, weight_decouple=True),
        False,
    ),
    "pytorch_optimizer.AdaBelief": (_po("AdaBelief", lr=0.01), False),
    "pytorch_optimizer.Adan": (_po("Adan", lr=0.01), False),
    "pytorch_optimizer.DAdaptAdam": (_po("DAdaptAdam", lr=1.0), False),
    "pytorch_optimizer.CAME": (_po("CAME", lr=0.01), False),
    "pytorch_optimizer.Tiger": (_po("Tiger", lr=1e-3), False),
    "pytorch_optimizer.AdEMAMix": (_po("AdEMAMix", lr=0.01), False),
    "pytorch_optimizer.SophiaH": (_po("SophiaH", lr=0.01), True),
    "pytorch_optimizer.AdaHessian": (_po("AdaHessian", lr=0.01), True),
    "timm.optim.Lamb": (_timm("Lamb", lr=0.01), False),
    "timm.optim.Lamb(always_adapt=True)": (_timm("Lamb", lr=0.01, always_adapt=True), False),
    "timm.optim.Lars": (_timm("Lars", lr=0.1), False),
    "timm.optim.Lars(always_adapt=True)": (_timm("Lars", lr=0.1, always_adapt=True), False),
    "timm.optim.AdamP": (_timm("AdamP", lr=0.01), False),
    "timm.optim.SGDP": (_timm("SGDP", lr=0.1), False),
    "timm.optim.NvNovoGrad": (_timm("NvNovoGrad", lr=0.01), False),
    "timm.optim.Adopt": (_timm("Adopt", lr=0.01), False),
    "timm.optim.Adopt(decoupled=True)": (_timm("Adopt", lr=0.01, decoupled=True), False),
    "timm.optim.MADGRAD(decoupled_decay=True)": (
        _timm("MADGRAD", lr=0.01, decoupled_decay=True),
        False,
    ),
    "timm.optim.Adahessian": (_timm("Adahessian", lr=0.01), True),
}


def built(make, groups):
    torch.manual_seed(5)  # the random probes of the Hessian optimizers
    opt = make(groups)
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()  # schedule-free optimizers train in "train" mode
    return opt


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_param_groups_equal_hand_made_groups_bit_for_bit(name):
    make, graph = FAMILIES[name]
    data = batches()
    plain = mlp()
    train(plain, built(make, hand_made(plain)), data, create_graph=graph)

    ours, coll = regularized()
    groups = rc.param_groups(ours, collection=coll)
    assert [g["weight_decay"] for g in groups] == [2 * C, 0.0]
    seen = []

    def penalty():
        value = coll.loss()
        seen.append(value.requires_grad)
        return value  # its value only: the optimizer's weight_decay applies it

    train(ours, built(make, groups), data, penalty, create_graph=graph)
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    assert seen == [False] * STEPS
    want = sum(C * (p.detach().double() ** 2).sum() for p in kernels(ours)).item()
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


def test_groups_by_coefficient_and_leave_the_other_penalties_to_the_loss():
    model = mlp()
    coll = rc.Collection()
    rc.add_regularizer(model, "0.weight", rc.l2(0.1), collection=coll)
    rc.add_regularizer(model, "2.weight", rc.l1_l2(0.0, 0.1), collection=coll)  # L2 alone
    rc.add_regularizer(model, "4.weight", rc.l2(0.2), collection=coll)
    rc.add_regularizer(model, "0.bias", rc.l1(0.3), collection=coll)
    rc.add_regularizer(model, "2.bias", rc.l1_l2(0.1, 0.1), collection=coll)
    rc.add_regularizer(model, "4.bias", rc.l2sp(0.1), collection=coll)
    groups = rc.param_groups(model, collection=coll, lr=0.5)
    p = dict(model.named_parameters())
    assert [[id(t) for t in g["params"]] for g in groups] == [
        [id(p["0.weight"]), id(p["2.weight"])],
        [id(p["4.weight"])],
        [id(p["0.bias"]), id(p["2.bias"]), id(p["4.bias"])],
    ]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.4, 0.0]
    assert [g.get("regcollect_l2") for g in groups] == [0.1, 0.2, None]
    assert all(g["lr"] == 0.5 for g in groups)
    # loss(): the decayed ones give their value only; L1, L1L2 and L2-SP keep their gradient.
    x = torch.randn(4, 6)
    model(x).sum().mul(0).add(coll.loss()).backward()
    for name in ("0.weight", "2.weight", "4.weight"):
        assert p[name].grad is None or not p[name].grad.any(), name
    assert torch.equal(p["0.bias"].grad, 0.3 * p["0.bias"].detach().sign())
    assert p["2.bias"].grad.abs().sum() > 0
    # The summary still shows every penalty, with its value.
    shown = coll.penalties()
    assert shown["0.weight"] == pytest.approx(
        0.1 * float((p["0.weight"].detach() ** 2).sum()), rel=1e-5
    )
    assert "0.weight" in coll.summary(file=io.StringIO())


def test_a_scheduled_coefficient_sets_the_groups_weight_decay_once_per_update():
    data = batches()
    schedule_value = linear(0.0, 2 * C, steps=4).value
    plain = mlp()
    groups = hand_made(plain, 0.0)
    opt = torch.optim.AdamW(groups, lr=0.01)
    for step, (x, y) in enumerate(data):
        groups[0]["weight_decay"] = 2 * schedule_value(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt.step()

    ours = mlp()
    coll = rc.Collection()
    schedule = linear(0.0, 2 * C, steps=4)
    rc.regularize(ours, kernel=rc.l2(schedule), collection=coll)
    ours_opt = torch.optim.AdamW(rc.param_groups(ours, collection=coll), lr=0.01)
    train(ours, ours_opt, data, coll.loss)
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    assert schedule.step == STEPS
    assert ours_opt.param_groups[0]["weight_decay"] == 2 * schedule_value(STEPS - 1)


def test_the_groups_survive_state_dict_and_a_restart():
    model, coll = regularized()
    opt = torch.optim.AdamW(rc.param_groups(model, collection=coll), lr=0.01)
    train(model, opt, batches(2), coll.loss)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    assert saved["param_groups"][0]["regcollect_l2"] == C
    again = torch.optim.AdamW(rc.param_groups(model, collection=coll), lr=0.01)
    again.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, again, batches(1), coll.loss)
    assert again.param_groups[0]["weight_decay"] == 2 * C


def test_a_forgotten_path_is_warned():
    model, coll = regularized()
    rc.param_groups(model, collection=coll)  # made, then not used
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(rc.RegcollectWarning, match="nothing applies their penalty"):
        train(model, opt, batches(1), coll.loss)


def test_the_forgotten_path_is_warned_again_after_another_param_groups_call():
    """One warning per set-up, not per process: a notebook that makes the same mistake in a
    new cell (param_groups() again, the optimizer from model.parameters()) hears it again."""
    model, coll = regularized()
    for _ in range(2):
        rc.param_groups(model, collection=coll)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.warns(rc.RegcollectWarning, match="nothing applies their penalty"):
            train(model, opt, batches(1), coll.loss)


def test_a_doubled_path_is_warned():
    # Attached too: the step's L2 and the group's weight_decay.
    model, coll = regularized()
    opt = torch.optim.SGD(rc.param_groups(model, collection=coll), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    with pytest.warns(rc.RegcollectWarning, match="regularized twice"):
        train(model, opt, batches(1), coll.loss)
    # The regularizer changed after the groups were made: loss() has its gradient back.
    model, coll = regularized()
    opt = torch.optim.SGD(rc.param_groups(model, collection=coll), lr=0.1)
    rc.regularize(model, kernel=rc.l2(2 * C), collection=coll)
    assert coll.loss().requires_grad
    with pytest.warns(rc.RegcollectWarning, match="both apply it"):
        train(model, opt, batches(1), coll.loss)
    # Removed since: the group still decays what nothing declares.
    model, coll = regularized()
    opt = torch.optim.SGD(rc.param_groups(model, collection=coll), lr=0.1)
    rc.add_regularizer(model, "0.weight", rc.l1(C), collection=coll)
    with pytest.warns(rc.RegcollectWarning, match="no longer carry the rc.l2 penalty"):
        train(model, opt, batches(1), coll.loss)


def test_bad_input_names_the_argument():
    model, coll = regularized()
    with pytest.raises(ValueError, match="weight_decay"):
        rc.param_groups(model, collection=coll, weight_decay=0.1)
    with pytest.raises(TypeError, match="model_or_params"):
        rc.param_groups(3, collection=coll)
    with pytest.raises(TypeError, match="model_or_params.*dict"):
        rc.param_groups([{"params": list(model.parameters())}], collection=coll)


# -- optimizers that differentiate inside step(), and the docs' table ------------------------

CREATE_GRAPH = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
HESSIAN = [name for name, (_, graph) in FAMILIES.items() if graph]


def trained(name, how):
    """The weights after STEPS steps of ``FAMILIES[name]``: ``"own"``, its weight_decay on the
    kernels (hand-made groups); ``"coupled"``/``"decoupled"``, ``rc.l2`` on them attached;
    ``"loss"``, the penalty through autograd."""
    make, graph = FAMILIES[name]
    model, coll = (mlp(), None) if how in ("own", "loss") else regularized()
    groups = hand_made(model, 2 * C if how == "own" else 0.0)  # one order of tensors
    opt = built(make, groups)
    if how in ("coupled", "decoupled"):
        rc.attach_optimizer(opt, decoupled=how == "decoupled", collection=coll)
    extra = None if coll is None else coll.loss
    if how == "loss":
        extra = lambda: C * sum((p**2).sum() for p in kernels(model))  # noqa: E731
    train(model, opt, batches(), extra, create_graph=graph)
    return list(model.parameters())


@CREATE_GRAPH
@pytest.mark.parametrize("name", HESSIAN)
def test_hessian_optimizers_attached_coupled_see_the_penalty_in_their_hessian(
    name, same_to_rounding
):
    """Coupled: the step equals the penalty through autograd, whose Hessian (2c I) the
    Hessian-vector product sees; it did not (the gradient was changed outside the graph)."""
    same_to_rounding(trained(name, "loss"), trained(name, "coupled"), STEPS)


@CREATE_GRAPH
@pytest.mark.parametrize("name", HESSIAN)
def test_hessian_optimizers_attached_decoupled_equal_their_own_decay(name, same_to_rounding):
    """Decoupled: equals the optimizer's own decoupled weight_decay on the same tensors; it
    raised "modified by an inplace operation" (the decay went in before the step
    differentiated the graph that saved the weights)."""
    same_to_rounding(trained(name, "own"), trained(name, "decoupled"), STEPS)


def documented():
    """The rows of the table in docs/migration/weight-decay.md: name -> its cells."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].strip("`") in FAMILIES:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


DOCS = Path(__file__).resolve().parents[1] / "docs" / "migration" / "weight-decay.md"


@CREATE_GRAPH
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_docs_table_of_optimizer_families_is_what_runs(name, same_to_rounding):
    """Each row says which path reproduces the optimizer's own weight_decay: attached coupled,
    attached decoupled (each "exact" to rounding, or not), and rc.param_groups (bit for bit,
    test_param_groups_equal_hand_made_groups_bit_for_bit)."""
    row = documented().get(name)
    assert row is not None, f"no row for {name} in {DOCS.name}"
    own = trained(name, "own")
    for how, cell in zip(("coupled", "decoupled"), row):
        try:
            same_to_rounding(own, trained(name, how), STEPS, MOMENTUM)
            exact = True
        except AssertionError:
            exact = False
        assert cell.startswith("exact") == exact, f"{name}, {how}: the docs say {cell!r}"
    assert row[2] == "bit for bit"


def test_timm_create_optimizer_v2_takes_the_groups_as_they_are():
    optim = pytest.importorskip("timm.optim")
    data = batches()
    plain = mlp()
    train(plain, optim.create_optimizer_v2(hand_made(plain), "lamb", lr=0.01), data)
    ours, coll = regularized()
    groups = rc.param_groups(ours, collection=coll)
    # Its weight_decay= is a default: each group's own value wins.
    opt = optim.create_optimizer_v2(groups, "lamb", lr=0.01, weight_decay=0.3)
    train(ours, opt, data, coll.loss)
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_rc_loss_while_compiling_leaves_the_groups_penalties_without_gradient():
    """The traced plan (torch.compile) makes the eager plan's choice."""
    model, coll = regularized()
    rc.param_groups(model.get_submodule("0"), collection=coll)  # the first kernel only
    total = torch.compile(coll.loss, backend="eager")()  # dynamo traces; no codegen
    assert total.item() == pytest.approx(coll.loss().item(), rel=1e-6)
    total.backward()
    first, *rest = kernels(model)
    assert first.grad is None
    for p in rest:
        assert torch.allclose(p.grad, 2 * C * p.detach())
