"""rc.attach_optimizer: penalties applied inside optimizer.step(), coupled and decoupled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import regcollect as rc

WD = 0.05
STEPS = 6  # batches()
# Every optimizer compared here keeps a running average of the gradient at 0.9 at most
# (SGD's momentum, Adam's beta1): the factor by which rounding differences add up.
MOMENTUM = 0.9


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def kernels(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def others(model):
    return [p for p in model.parameters() if p.dim() < 2]


def decay_groups(model):
    """Parameter groups with ``weight_decay=WD`` on the kernels only, as rc.regularize's
    ``kernel=`` covers them."""
    return [
        {"params": kernels(model), "weight_decay": WD},
        {"params": others(model), "weight_decay": 0.0},
    ]


def train(model, opt, data, extra=None):
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda params, **kw: torch.optim.SGD(params, lr=0.1, momentum=0.9, **kw),
        lambda params, **kw: torch.optim.Adam(params, lr=0.01, **kw),
        lambda params, **kw: torch.optim.RMSprop(params, lr=0.01, **kw),
        lambda params, **kw: torch.optim.Adam(params, lr=torch.tensor(0.01), fused=True, **kw),
        # maximize=True negates the gradient before the optimizer's math and adds weight
        # decay after: the penalty still shrinks the weights, as weight_decay does.
        lambda params, **kw: torch.optim.SGD(params, lr=0.1, momentum=0.9, maximize=True, **kw),
        lambda params, **kw: torch.optim.Adam(params, lr=0.01, maximize=True, **kw),
    ],
    ids=[
        "SGD-momentum",
        "Adam",
        "RMSprop",
        "Adam-fused-tensor-lr",
        "SGD-momentum-maximize",
        "Adam-maximize",
    ],
)
def test_coupled_equals_the_optimizers_weight_decay_on_the_same_parameters(make, same_to_rounding):
    data = batches()
    plain = mlp()
    groups = decay_groups(plain)
    train(plain, make(groups), data)

    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(WD / 2), collection=coll)
    opt = make(ours.parameters())
    rc.attach_optimizer(opt, collection=coll)
    seen = []

    def penalty():
        value = coll.loss()
        seen.append((value.item(), value.requires_grad))
        return value  # added to the loss: its value is printed, its gradient comes from the step

    train(ours, opt, data, penalty)
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)
    # loss() still has the penalty's value, without a gradient (nothing counted twice).
    assert all(not grad for _, grad in seen)
    want = sum((WD / 2) * (p.detach().double() ** 2).sum() for p in kernels(ours)).item()
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "options", [{}, {"fused": True}], ids=["foreach-or-loop", "fused-tensor-lr"]
)
def test_decoupled_equals_adamw(options, same_to_rounding):
    lr = torch.tensor(0.01) if options else 0.01  # fused optimizers take a tensor lr
    data = batches()
    plain = mlp()
    groups = decay_groups(plain)
    train(plain, torch.optim.AdamW(groups, lr=lr, **options), data)

    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(WD / 2), collection=coll)
    opt = torch.optim.Adam(ours.parameters(), lr=lr, **options)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    train(ours, opt, data, coll.loss)
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)


@pytest.mark.parametrize("make", [torch.optim.NAdam, torch.optim.RAdam], ids=["nadam", "radam"])
def test_decoupled_equals_nadam_and_radam_with_decoupled_weight_decay(make, same_to_rounding):
    """The AdamW mapping holds for the other optimizers with a decoupled decay: ``NAdam``/
    ``RAdam(decoupled_weight_decay=True, weight_decay=wd)`` are the same optimizer without
    it plus ``rc.l2(wd / 2)`` attached with ``decoupled=True``."""
    data = batches()
    plain = mlp()
    train(plain, make(decay_groups(plain), lr=0.01, decoupled_weight_decay=True), data)
    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(WD / 2), collection=coll)
    opt = make(ours.parameters(), lr=0.01)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    train(ours, opt, data, coll.loss)
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)


def test_decoupled_follows_a_learning_rate_schedule(same_to_rounding):
    data = batches()
    plain = mlp()
    opt_plain = torch.optim.AdamW(decay_groups(plain), lr=0.01)
    sched_plain = torch.optim.lr_scheduler.StepLR(opt_plain, step_size=2, gamma=0.3)
    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(WD / 2), collection=coll)
    opt = torch.optim.Adam(ours.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    for x, y in data:
        for model, o, s in ((plain, opt_plain, sched_plain), (ours, opt, sched)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
            s.step()
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)


def sparse_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 50, generator=g)
    w_true = torch.zeros(50)
    w_true[:5] = torch.tensor([2.0, -3.0, 1.5, 4.0, -2.5])
    y = x @ w_true + 0.01 * torch.randn(200, generator=g)
    return x, y, w_true


def fit_sparse(proximal):
    x, y, _ = sparse_problem()
    coll = rc.Collection()
    torch.manual_seed(0)
    layer = rc.nn.Linear(50, 1, bias=False, kernel_regularizer=rc.l1(0.05), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    if proximal:
        rc.attach_optimizer(opt, decoupled=True, collection=coll)
    for _ in range(300):
        opt.zero_grad()
        (torch.nn.functional.mse_loss(layer(x).squeeze(1), y) + coll.loss()).backward()
        opt.step()
    return layer.weight.detach()[0]


def test_proximal_l1_gives_exact_zeros_and_keeps_the_true_weights():
    _, _, w_true = sparse_problem()
    proximal, in_loss = fit_sparse(True), fit_sparse(False)
    irrelevant = w_true == 0
    assert (proximal[irrelevant] == 0).float().mean() >= 0.9  # exact zeros
    assert (in_loss[irrelevant] == 0).float().mean() == 0  # L1 in the loss: small, never 0
    assert torch.all(proximal[~irrelevant].abs() > 1.0)
    assert torch.allclose(proximal[~irrelevant], w_true[~irrelevant], atol=0.2)


def test_only_l1_l2_terms_move_to_the_step_the_rest_keeps_its_gradient():
    coll = rc.Collection()
    layer = rc.nn.Linear(
        3, 3, kernel_regularizer=rc.orthogonal(1.0), bias_regularizer=rc.l1(0.5), collection=coll
    )
    act = rc.nn.Linear(3, 3, activity_regularizer=rc.l2(0.1), collection=coll)
    model = torch.nn.Sequential(act, layer)  # the activity penalty is upstream of layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    out = model(torch.randn(2, 3))
    total = coll.loss()
    assert total.requires_grad  # orthogonal and activity penalties stay differentiable
    (out.sum() + total).backward()
    assert layer.weight.grad.abs().sum() > 0
    # The L1 bias penalty is not in the autograd gradient (out.sum() gives 2 per unit)...
    assert torch.equal(layer.bias.grad, torch.full((3,), 2.0))
    b = layer.bias.detach().clone()
    opt.step()  # ... the step adds it: 0.5 * sign(b)
    assert torch.allclose(layer.bias.detach(), b - 0.1 * (2.0 + 0.5 * torch.sign(b)))
    # A parameter the optimizer does not hold keeps its autograd gradient.
    other = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=coll)
    assert coll.loss(other).requires_grad


def test_grad_scaler_skipped_step_applies_no_penalty_and_accumulation_applies_it_once():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = layer.weight.detach().clone()
    out = layer(torch.tensor([[float("inf"), 1.0]])).sum() + coll.loss()
    scaler.scale(out).backward()
    scaler.step(opt)  # inf gradients: the step is skipped, and with it the penalty
    scaler.update()
    assert torch.equal(layer.weight.detach(), before)
    # Accumulation over 3 micro-batches: the penalty is applied once, in the one step.
    opt.zero_grad()
    for _ in range(3):
        (layer(torch.zeros(1, 2)).sum() * 0.0 + coll.loss() / 3).backward()
    w = layer.weight.detach().clone()
    opt.step()
    assert torch.allclose(layer.weight.detach(), w - 0.1 * (2 * 0.5) * w)


def test_a_weight_decay_on_the_same_parameters_warns_once():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=1e-4)
    rc.attach_optimizer(opt, collection=coll)
    layer(torch.ones(1, 2)).sum().backward()
    with pytest.warns(
        rc.RegcollectWarning, match=r"weight_decay=0.0001 on SGD: they are regularized twice"
    ):
        opt.step()
    opt.step()  # once


def test_remove_restores_the_autograd_path_and_bad_arguments():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    handle = rc.attach_optimizer(opt, collection=coll)
    assert not coll.loss().requires_grad
    handle.remove()
    assert coll.loss().requires_grad
    w = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(w)
    opt.step()  # no hook any more: nothing applied
    assert torch.equal(layer.weight.detach(), w)
    with pytest.raises(TypeError, match=r"must be a torch.optim.Optimizer, or a wrapper.*got list"):
        rc.attach_optimizer([layer.weight])
    with pytest.raises(TypeError, match="decoupled must be True or False, got 'yes'"):
        rc.attach_optimizer(opt, decoupled="yes")


def test_parameters_added_to_the_optimizer_later_are_followed():
    coll = rc.Collection()
    a = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    b = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    model = torch.nn.ModuleList([a, b])
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    model[0](torch.ones(1, 2)).sum().backward()
    opt.step()
    assert coll.loss(b).requires_grad  # b is not held: autograd
    opt.add_param_group({"params": list(b.parameters())})
    b(torch.ones(1, 2)).sum().backward()
    w = b.weight.detach().clone()
    g = b.weight.grad.clone()
    opt.step()
    assert torch.allclose(b.weight.detach(), w - 0.1 * (g + w))
    assert not coll.loss(b).requires_grad  # now the step applies it


def test_a_compiled_training_step_equals_eager(same_to_rounding):
    def run(compiled):
        torch.manual_seed(0)
        coll = rc.Collection()
        model = torch.nn.Sequential(
            rc.nn.Linear(4, 4, kernel_regularizer=rc.l1_l2(0.01, 0.05), collection=coll),
            torch.nn.Tanh(),
            rc.nn.Linear(4, 1, collection=coll),
        )
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        rc.attach_optimizer(opt, decoupled=True, collection=coll)
        x, y = torch.randn(8, 4), torch.randn(8, 1)

        def step():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) + coll.loss()
            loss.backward()
            opt.step()  # the hooks run inside, compiled or not
            return loss

        step = torch.compile(step) if compiled else step
        losses = [step().item() for _ in range(4)]
        return losses, [p.detach().clone() for p in model.parameters()]

    (eager_losses, eager), (got_losses, got) = run(False), run(True)
    assert got_losses == pytest.approx(eager_losses, rel=1e-5)
    same_to_rounding(eager, got, steps=4, momentum=MOMENTUM)


def peak_bytes(fn):
    """The most CPU memory ``fn`` holds at once beyond what it started with, in bytes (the
    benchmark's measurement, benchmarks/memory.py)."""
    path = Path(__file__).parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_bytes(fn, torch.device("cpu"))


def wide_model():
    """12 kernels of 256 KiB and one of 1 MiB (the largest gradient), biases unregularized."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(12)] + [torch.nn.Linear(512, 512)]
    model = torch.nn.ModuleList(layers)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize(
    "regularizer, decoupled",
    [
        (rc.l2(WD / 2), False),
        (rc.l2(WD / 2), True),
        (rc.l1(WD), False),
        (rc.l1(WD), True),
        (rc.l1_l2(WD, WD), True),
        (rc.l2sp(WD / 2), False),
        (rc.group_lasso(WD), True),
    ],
    ids=["l2", "l2-decoupled", "l1", "l1-proximal", "l1l2-decoupled", "l2sp", "group-lasso"],
)
def test_the_attached_step_holds_no_more_memory_than_weight_decay(regularizer, decoupled):
    plain = wide_model()
    groups = decay_groups(plain)
    opt_plain = torch.optim.SGD(groups, lr=0.1)
    ours = wide_model()
    coll = rc.Collection()
    rc.regularize(ours, kernel=regularizer, collection=coll)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
    opt_plain.step(), opt.step()  # state and plans built outside the measurement
    weight_decay = peak_bytes(opt_plain.step)
    attached = peak_bytes(opt.step)
    # SGD's weight_decay holds a fresh gradient: on the CPU one tensor at a time (1 MiB).
    assert weight_decay >= 512 * 512 * 4
    assert attached <= weight_decay
    if isinstance(regularizer, rc.L2):  # in place: nothing at all
        assert attached < 4096


def test_the_proximal_step_is_soft_thresholding_and_the_coupled_l1_step_adds_the_sign():
    model = wide_model()
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l1(0.5), collection=coll)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = rc.attach_optimizer(opt, decoupled=True, collection=coll)
    for p in kernels(model):  # a third of the weights within the threshold 0.1 * 0.5
        p.data = torch.linspace(-0.15, 0.15, p.numel()).reshape(p.shape)
    before = [p.detach().clone() for p in kernels(model)]
    grads = [p.grad.clone() for p in kernels(model)]
    opt.step()
    for p, w, g in zip(kernels(model), before, grads):
        moved = w - 0.1 * g
        want = torch.sign(moved) * (moved.abs() - 0.05).clamp_min(0)
        assert torch.allclose(p.detach(), want, atol=1e-7)
        assert torch.equal(p.detach() == 0, moved.abs() <= 0.05)
    handle.remove()
    rc.attach_optimizer(opt, collection=coll)  # coupled: grad += 0.5 * sign(w)
    before = [p.detach().clone() for p in kernels(model)]
    opt.step()
    for p, w, g in zip(kernels(model), before, grads):
        assert torch.allclose(p.detach(), w - 0.1 * (g + 0.5 * torch.sign(w)), atol=1e-7)


def test_the_value_of_attached_penalties_is_exact_and_carries_no_gradient():
    # Many small kernels (computed from one stacked copy) and a large one.
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [torch.nn.Linear(64, 64) for _ in range(20)] + [torch.nn.Linear(1024, 256)]
    )
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l1_l2(1e-3, 5e-3), bias=rc.l1(1e-2), collection=coll)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    value = coll.loss()
    assert not value.requires_grad
    want = sum(
        1e-3 * m.weight.detach().double().abs().sum()
        + 5e-3 * (m.weight.detach().double() ** 2).sum()
        + 1e-2 * m.bias.detach().double().abs().sum()
        for m in model
    )
    assert value.item() == pytest.approx(want.item(), rel=1e-6)
    first = model[0].weight.detach().double()
    want_first = 1e-3 * first.abs().sum() + 5e-3 * (first**2).sum()
    assert coll.penalties()["0.weight"] == pytest.approx(want_first.item(), rel=1e-6)


def test_clipping_sees_the_data_gradient_and_frozen_parameters_are_left_alone():
    coll = rc.Collection()
    a = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    b = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5), collection=coll)
    b.weight.requires_grad_(False)  # frozen, but still in the optimizer
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    x = torch.ones(1, 2)
    (a(x).sum() + b(x).sum() + coll.loss()).backward()
    assert torch.equal(a.weight.grad, torch.ones(2, 2))  # the data gradient only
    # Clipping before step() scales the data gradient; the penalty is added after it, as
    # weight_decay is: w -= lr * (clipped + 2c * w).
    torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm=0.5)
    clipped = a.weight.grad.clone()
    assert clipped.norm() < 0.5
    w, frozen = a.weight.detach().clone(), b.weight.detach().clone()
    opt.step()
    assert torch.allclose(a.weight.detach(), w - 0.1 * (clipped + 2 * 0.5 * w))
    assert torch.equal(b.weight.detach(), frozen)  # no gradient: neither decayed nor counted
    want = 0.5 * (a.weight.detach().double() ** 2).sum().item()
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


def closure_for(model, opt, x, y, extra=None):
    """The closure ``step(closure)`` takes: zero the gradients, forward, backward."""

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        closure.returned.append(loss)
        return loss

    closure.returned = []
    return closure


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_a_step_with_a_closure_applies_the_penalty_to_the_gradients_the_closure_computes(
    decoupled, same_to_rounding
):
    # step(closure) runs the closure (zero_grad, backward) inside step(), after the step's
    # pre-hooks: the penalty must be applied after it, or the closure wipes it out.
    data = batches()
    plain = mlp()
    groups = decay_groups(plain)
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt_plain = make(groups, lr=0.01)
    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(WD / 2), collection=coll)
    opt = torch.optim.Adam(ours.parameters(), lr=0.01)
    rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
    for x, y in data:
        opt_plain.step(closure_for(plain, opt_plain, x, y))
        closure = closure_for(ours, opt, x, y, coll.loss)
        assert opt.step(closure=closure) is closure.returned[0]  # step() returns its loss
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)


def test_lbfgs_with_the_penalty_attached_equals_lbfgs_with_the_penalty_in_the_loss():
    # L-BFGS calls the closure several times per step (line search): the penalty's gradient
    # is added to each evaluation, as autograd does when rc.loss() carries it.
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    results = []
    for attach in (False, True):
        model = mlp()
        coll = rc.Collection()
        rc.regularize(model, kernel=rc.l2(0.05), bias=rc.l1(0.01), collection=coll)
        opt = torch.optim.LBFGS(
            model.parameters(), lr=0.5, max_iter=5, line_search_fn="strong_wolfe"
        )
        if attach:
            rc.attach_optimizer(opt, collection=coll)
        losses = [opt.step(closure_for(model, opt, x, y, coll.loss)).item() for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (want_losses, want), (got_losses, got) = results
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want[0], mlp()[0].weight)  # it trained


def test_lightning_training_with_an_attached_optimizer_equals_weight_decay(same_to_rounding):
    # Lightning's automatic optimization calls optimizer.step(closure=...) and runs
    # training_step, zero_grad and backward inside that closure.
    pytest.importorskip("lightning", reason="pip install -e .[lightning]")
    import lightning as L

    data = batches()

    class Module(L.LightningModule):
        def __init__(self, attach):
            super().__init__()
            self.net, self.attach = mlp(), attach
            self.coll = rc.Collection()
            if attach:
                rc.regularize(self.net, kernel=rc.l2(WD / 2), collection=self.coll)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            return loss + self.coll.loss() if self.attach else loss

        def configure_optimizers(self):
            if not self.attach:
                return torch.optim.SGD(decay_groups(self.net), lr=0.1, momentum=0.9)
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            rc.attach_optimizer(opt, collection=self.coll)
            return opt

    trained = []
    for attach in (False, True):
        module = Module(attach)
        trainer = L.Trainer(
            max_steps=len(data),
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
        trained.append(list(module.net.parameters()))
    same_to_rounding(*trained, STEPS, MOMENTUM)


def test_attaching_an_optimizer_again_replaces_its_attachment_instead_of_doubling_it():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, bias=False, kernel_regularizer=rc.l2(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    first = rc.attach_optimizer(opt, collection=coll)
    rc.attach_optimizer(opt, collection=coll)  # the set-up code (a notebook cell) run again
    layer.weight.grad = torch.zeros(2, 2)
    w = layer.weight.detach().clone()
    opt.step()
    assert torch.allclose(layer.weight.detach(), w - 0.1 * (2 * 0.5) * w)  # once, not twice
    # Attaching again in the other mode switches to it: L2 as a decay of the weights by
    # 1 - lr * 2c before the update, with a gradient of 1 this time.
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    first.remove()  # the replaced handle: nothing left to undo
    layer.weight.grad = torch.ones(2, 2)
    w = layer.weight.detach().clone()
    opt.step()
    assert torch.allclose(layer.weight.detach(), w * (1 - 0.1 * 2 * 0.5) - 0.1)
    assert not coll.loss().requires_grad  # still attached


def test_a_gans_two_optimizers_each_apply_their_own_models_penalties():
    coll = rc.Collection()
    G = rc.nn.Linear(2, 2, bias=False, kernel_regularizer=rc.l2(0.5), collection=coll)
    D = rc.nn.Linear(2, 1, bias=False, kernel_regularizer=rc.l1(0.2), collection=coll)
    opt_g = torch.optim.SGD(G.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    rc.attach_optimizer(opt_g, collection=coll)
    rc.attach_optimizer(opt_d, collection=coll)
    z = torch.randn(4, 2)
    # D step (the generator's output detached), then G step, as in the PyTorch DCGAN tutorial.
    g, d = G.weight.detach().clone(), D.weight.detach().clone()
    opt_d.zero_grad()
    d_loss = D(G(z).detach()).mean() + coll.loss(D)
    d_loss.backward()
    d_grad = D.weight.grad.clone()
    opt_d.step()
    assert torch.allclose(D.weight.detach(), d - 0.1 * (d_grad + 0.2 * torch.sign(d)))
    assert torch.equal(G.weight.detach(), g)  # D's step leaves G alone
    opt_g.zero_grad()
    g_loss = -D(G(z)).mean() + coll.loss(G)
    g_loss.backward()
    g_grad = G.weight.grad.clone()
    opt_g.step()
    assert torch.allclose(G.weight.detach(), g - 0.1 * (g_grad + 2 * 0.5 * g))
    # Each model's loss() is its own penalty's value, without a gradient.
    d_value, g_value = coll.loss(D), coll.loss(G)
    assert not d_value.requires_grad and not g_value.requires_grad
    assert d_value.item() == pytest.approx(0.2 * D.weight.detach().abs().sum().item(), rel=1e-6)
    assert g_value.item() == pytest.approx(0.5 * (G.weight.detach() ** 2).sum().item(), rel=1e-6)


def test_a_maximizing_optimizer_shrinks_the_weights_under_l1_too():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, bias=False, kernel_regularizer=rc.l1(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, maximize=True)
    rc.attach_optimizer(opt, collection=coll)
    layer.weight.grad = torch.zeros(2, 2)  # no data gradient: only the penalty moves w
    w = layer.weight.detach().clone()
    opt.step()
    assert torch.allclose(layer.weight.detach(), w - 0.1 * 0.5 * torch.sign(w))


def test_an_accelerate_prepared_optimizer_can_be_attached_and_accumulation_steps_once(
    same_to_rounding,
):
    pytest.importorskip("accelerate", reason="pip install -e .[transformers]")
    from accelerate import Accelerator

    data = batches(8)
    trained = []
    for attach in (False, True):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = mlp()
        coll = rc.Collection()
        if attach:
            rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            rc.attach_optimizer(opt, collection=coll)  # attached before prepare() too: once
        else:
            groups = decay_groups(model)
            opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        model, opt = accelerator.prepare(model, opt)
        if attach:  # the prepared optimizer: the wrapped one's step applies the penalty
            rc.attach_optimizer(opt, collection=coll)
        for x, y in data:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y) + coll.loss()
                accelerator.backward(loss)
                opt.step()  # a real step every second batch only
                opt.zero_grad()
        trained.append([p.detach().clone() for p in model.parameters()])
    same_to_rounding(*trained, STEPS, MOMENTUM)


# -- the seams: scalers, parameter groups, dropped optimizers, wrappers ---------------------


def scaled_training(model, opt, coll, data, inf_at=3):
    """``GradScaler`` as fp16 training uses it (no ``unscale_``): the step after ``inf_at``
    batches has infinite gradients, and the scaler skips it."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) + coll.loss()
        if i == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize(
    ("theirs", "ours", "decoupled"),
    [
        (
            lambda p, fused: torch.optim.Adam(p, lr=0.01, fused=fused),
            lambda p, fused: torch.optim.Adam(p, lr=0.01, fused=fused),
            False,
        ),
        (
            lambda p, fused: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=fused),
            lambda p, fused: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=fused),
            False,
        ),
        (
            lambda p, fused: torch.optim.AdamW(p, lr=0.01, fused=fused),
            lambda p, fused: torch.optim.Adam(p, lr=0.01, fused=fused),
            True,
        ),
    ],
    ids=["Adam-coupled", "SGD-coupled", "AdamW-decoupled"],
)
def test_under_grad_scaler_fused_optimizers_equal_their_weight_decay(
    theirs, ours, decoupled, fused, same_to_rounding
):
    # Fused optimizers take the scale and the skip flag inside step() (grad_scale,
    # found_inf): the coupled penalty goes on gradients still multiplied by the scale, and a
    # skipped step must apply nothing, the decoupled decay included.
    data = batches()
    plain = mlp()
    scaled_training(plain, theirs(decay_groups(plain), fused), rc.Collection(), data)
    model = mlp()
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
    opt = ours(model.parameters(), fused)
    rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
    scaled_training(model, opt, coll, data)
    same_to_rounding(plain.parameters(), model.parameters(), STEPS, MOMENTUM)


def test_a_step_the_scaler_skips_does_not_advance_a_schedule():
    layer = torch.nn.Linear(2, 2)
    coll = rc.Collection()
    schedule = rc.schedules.linear(0.0, 1.0, steps=10)
    rc.add_regularizer(layer, "weight", rc.l2(schedule), collection=coll)
    for fused in (False, True):
        schedule.set_step(0)
        opt = torch.optim.Adam(layer.parameters(), lr=0.01, fused=fused)
        rc.attach_optimizer(opt, decoupled=True, collection=coll)
        scaled_training(layer, opt, coll, [(torch.ones(1, 2), torch.zeros(1, 2))] * 3, inf_at=1)
        assert schedule.step == 2, fused  # three steps, one skipped


def test_a_parameter_group_added_after_attaching_is_counted_once():
    data = batches(3)
    plain = mlp()
    opt_plain = torch.optim.SGD([*plain[0].parameters(), *plain[4].parameters()], lr=0.1)
    opt_plain.add_param_group({"params": [plain[2].weight], "weight_decay": WD})
    opt_plain.add_param_group({"params": [plain[2].bias]})
    model = mlp()
    coll = rc.Collection()
    rc.add_regularizer(model[2], "weight", rc.l2(WD / 2), collection=coll)
    opt = torch.optim.SGD([*model[0].parameters(), *model[4].parameters()], lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    assert coll.loss().requires_grad  # logged once: model[2] is not held yet, autograd
    opt.add_param_group({"params": model[2].parameters()})
    for net, o, extra in ((plain, opt_plain, None), (model, opt, coll.loss)):
        for x, y in data:
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            (loss if extra is None else loss + extra()).backward()
            o.step()
    assert not coll.loss().requires_grad  # the step applies it: no autograd path as well
    assert torch.allclose(plain[2].weight, model[2].weight, rtol=0, atol=3 * 8 * 1.2e-7)


def test_a_dropped_attached_optimizer_gives_the_penalty_back_to_autograd():
    model = mlp()
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    assert not coll.loss().requires_grad
    # The attached optimizer is dropped (a new, unattached one trains from here): the
    # penalty must reach the new optimizer through the loss's gradient.
    del opt
    value = coll.loss()
    assert value.requires_grad
    value.backward()  # a penalty-only backward works
    w = model[0].weight
    assert torch.allclose(w.grad, WD * w.detach())


def test_a_parameter_subclass_is_regularized_once():
    class Tagged(torch.nn.Parameter):
        pass

    def build():
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 3)
        layer.weight = Tagged(layer.weight.detach().clone())
        return layer

    x = torch.randn(4, 3)
    plain = build()
    opt_plain = torch.optim.SGD([{"params": [plain.weight], "weight_decay": WD}], lr=0.1)
    layer = build()
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.l2(WD / 2), collection=coll)
    opt = torch.optim.SGD([layer.weight], lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    for net, o, extra in ((plain, opt_plain, None), (layer, opt, coll.loss)):
        for _ in range(3):
            o.zero_grad()
            loss = net(x).pow(2).mean()
            (loss if extra is None else loss + extra()).backward()
            o.step()
    assert torch.allclose(plain.weight, layer.weight, rtol=0, atol=3 * 8 * 1.2e-7)


def test_an_optimizer_without_a_learning_rate_works_coupled():
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    Adafactor = transformers.optimization.Adafactor

    def run(attach):
        model = mlp()
        coll = rc.Collection()
        rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
        opt = Adafactor(model.parameters(), lr=None, relative_step=True, warmup_init=True)
        if attach:
            rc.attach_optimizer(opt, collection=coll)
        train(model, opt, batches(), coll.loss)
        return model

    # Coupled, the penalty's gradient is the same in the step as through autograd.
    for a, b in zip(run(False).parameters(), run(True).parameters()):
        assert torch.allclose(a, b, rtol=0, atol=STEPS * 8 * 1.2e-7 * 10)
    with pytest.raises(ValueError, match="decoupled=True needs a learning rate.*Adafactor"):
        model = mlp()
        coll = rc.Collection()
        rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
        opt = Adafactor(model.parameters(), lr=None, relative_step=True, warmup_init=True)
        rc.attach_optimizer(opt, decoupled=True, collection=coll)
        train(model, opt, batches(1), coll.loss)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation as it is usually written (davda54/sam): ``first_step``
    moves to the worst nearby point, ``second_step`` restores and steps the base optimizer."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]])
        )
        for group in self.param_groups:
            for p in group["params"]:
                e = p.grad * group["rho"] / (norm + 1e-12)
                p.add_(e)
                self.state[p]["e"] = e
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.sub_(self.state[p]["e"])
        self.base_optimizer.step()
        self.zero_grad()


class Lookahead(torch.optim.Optimizer):
    """timm's Lookahead, reduced: it never calls ``Optimizer.__init__`` (it makes the hook
    dictionaries itself) and steps the optimizer it holds as ``_base_optimizer``."""

    def __init__(self, base_optimizer, alpha=0.5, k=2):
        from collections import OrderedDict

        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state
        self.alpha, self.k, self.count = alpha, k, 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            fast = [p for g in self.param_groups for p in g["params"]]
            for p, slow in zip(fast, self.slow):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


def test_sam_attached_applies_the_penalty_once_per_real_update(same_to_rounding):
    data = batches()

    def run(attach):
        model = mlp()
        coll = rc.Collection()
        if attach:
            rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
            opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
            rc.attach_optimizer(opt, collection=coll)
        else:
            opt = SAM(decay_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9)
        for x, y in data:
            (torch.nn.functional.mse_loss(model(x), y) + coll.loss()).backward()
            opt.first_step()
            (torch.nn.functional.mse_loss(model(x), y) + coll.loss()).backward()
            opt.second_step()
        return model

    same_to_rounding(run(False).parameters(), run(True).parameters(), STEPS, MOMENTUM)


def test_lookahead_attached_applies_the_penalty_once_and_advances_schedules_once(
    same_to_rounding,
):
    data = batches()

    def run(attach):
        model = mlp()
        coll = rc.Collection()
        # A scheduled coefficient that stays 0: it must advance once per update, and
        # changes no weight, so the trainings compare with and without it.
        schedule = rc.schedules.linear(0.0, 0.0, steps=100)
        if attach:
            rc.regularize(model, kernel=rc.l2(WD / 2), collection=coll)
            rc.add_regularizer(model[0], "bias", rc.l1(schedule), collection=coll)
            opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
            rc.attach_optimizer(opt, collection=coll)
        else:
            opt = Lookahead(torch.optim.SGD(decay_groups(model), lr=0.1, momentum=0.9))
        train(model, opt, data, coll.loss)
        return model, schedule

    (plain, _), (ours, schedule) = run(False), run(True)
    same_to_rounding(plain.parameters(), ours.parameters(), STEPS, MOMENTUM)
    assert schedule.step == STEPS  # once per real update, not once per optimizer stepped


def test_a_wrapper_without_step_hooks_or_a_known_inner_optimizer_is_refused():
    class Opaque(torch.optim.Optimizer):
        def __init__(self, inner):
            self._inner = inner
            self.param_groups = inner.param_groups

        def step(self, closure=None):
            return self._inner.step(closure)

    inner = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"Opaque.*step hooks.*attach the optimizer"):
        rc.attach_optimizer(Opaque(inner))


def test_a_parameter_frozen_with_a_zero_gradient_is_left_alone_unlike_weight_decay():
    # zero_grad(set_to_none=False) leaves a zero .grad on a parameter frozen afterwards:
    # weight_decay decays it; the attached step leaves it, as loss() and the summary do
    # (frozen parameters contribute nothing).
    def run(attach):
        torch.manual_seed(0)
        layer = torch.nn.Linear(2, 2)
        coll = rc.Collection()
        if attach:
            rc.add_regularizer(layer, "weight", rc.l2(WD / 2), collection=coll)
            opt = torch.optim.SGD([layer.weight], lr=0.1)
            rc.attach_optimizer(opt, collection=coll)
        else:
            opt = torch.optim.SGD([layer.weight], lr=0.1, weight_decay=WD)
        layer(torch.ones(1, 2)).sum().backward()
        opt.zero_grad(set_to_none=False)
        layer.weight.requires_grad_(False)
        before = layer.weight.detach().clone()
        opt.step()
        return before, layer.weight.detach()

    (b0, w0), (b1, w1) = run(False), run(True)
    assert torch.equal(b0, b1) and not torch.equal(w0, b0)  # weight_decay moved it
    assert torch.equal(w1, b1)  # the attached step did not


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_a_parameter_two_attached_optimizers_hold_gets_its_penalty_once(
    decoupled, same_to_rounding
):
    """A shared trunk stepped by two optimizers (two heads, or a GAN's shared layer). Coupled,
    each optimizer sees the gradient of the total loss at the weights the backward saw, as
    with the penalty through autograd, not the penalty twice (it was: the first optimizer's
    step left it in .grad for the second to add again). Decoupled, each optimizer decays the
    weight as its own weight_decay would: AdamW twice."""
    data = batches(4)

    def run(attached):
        model = mlp()
        coll = rc.Collection()
        reg = rc.l2(WD / 2) if decoupled else rc.l1_l2(0.01, WD / 2)
        if attached or not decoupled:
            rc.add_regularizer(model[0], "weight", reg, collection=coll)
        make = (
            (torch.optim.AdamW, torch.optim.AdamW)
            if decoupled
            else (sgd_with_momentum, torch.optim.Adam)
        )
        trunk = {
            "params": [model[0].weight],
            "weight_decay": WD if decoupled and not attached else 0,
        }
        first = make[0](
            [trunk, {"params": [model[0].bias, *model[2].parameters()]}], lr=0.05, weight_decay=0
        )
        second = make[1](
            [dict(trunk), {"params": [model[0].bias, *model[4].parameters()]}],
            lr=0.01,
            weight_decay=0,
        )
        if attached:
            for opt in (first, second):
                rc.attach_optimizer(opt, collection=coll, decoupled=decoupled)
        for x, y in data:
            first.zero_grad()
            second.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if not attached and not decoupled:
                loss = loss + coll.loss()
            loss.backward()
            first.step()
            second.step()
        return model

    want, got = run(attached=False), run(attached=True)
    same_to_rounding(want.parameters(), got.parameters(), steps=2 * len(data), momentum=MOMENTUM)


def sgd_with_momentum(params, **options):
    return torch.optim.SGD(params, momentum=0.9, **options)
