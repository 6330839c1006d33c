"""The training loops people write (issue 35), each as the user writes it, compared with the
penalty written by hand on plain ``torch.nn`` layers.

The rule under test (docs/concepts.md, "Activity penalties"): ``rc.loss()`` holds, for each
layer with an activity regularizer, ``regularizer(output) / batch_size`` of each of its calls
in the most recent forward pass made with gradients on, and reading it changes nothing. A
forward pass starts with a call of a module that holds such layers while none of the modules
holding it is running (Keras resets ``layer.losses`` at the outermost call).

Tolerances: each comparison is between two float32 computations of the same sums in a
different order (the grouped engine against a hand-written loop), a few additions of values
of magnitude <= 10, so a relative 1e-6 (8 ulps) covers them; weights after ``n`` SGD steps
drift by at most that per step: ``n * 1e-6`` relative.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import regcollect as rc
from regcollect._torch_compat import EXPORT_IS_SEEN

C = 0.05  # the activity coefficient


def relu_mlp(activity: bool = True) -> torch.nn.Sequential:
    """Linear(4, 8) -> ReLU -> Linear(8, 1); the first layer's output carries ``l2(C)``."""
    reg = rc.l2(C) if activity else None
    return torch.nn.Sequential(
        rc.nn.Linear(4, 8, activity_regularizer=reg), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )


def plain_twin(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same weights in plain torch.nn layers (no regcollect anywhere)."""
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    return twin


def by_hand(twin: torch.nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, activity penalty)`` of one pass of the plain twin: Keras's
    ``C * sum(h**2) / batch``."""
    hidden = twin[0](x)
    return twin[2](twin[1](hidden)), C * (hidden**2).sum() / x.shape[0]


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-6) -> bool:
    return all(torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-2) for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", rc.RegcollectWarning)
        yield


# -- reads never change training ---------------------------------------------------------------


@pytest.mark.parametrize("read", ["loss", "penalties", "summary", "losses"])
def test_a_logging_read_between_micro_batches_of_one_graph_changes_nothing(read, capsys):
    """Two micro-batches, one graph, one backward; the user adds rc.loss() per micro-batch
    (as Keras's model.losses is read after each call). A logging read after the first one
    must leave the penalty and the gradients as they are without it."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)
    model = relu_mlp()
    twin = plain_twin(model)

    def run(log: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        out1 = model(x1)
        pen1 = rc.loss(model)
        if log:
            {
                "loss": lambda: rc.loss().item(),
                "penalties": rc.penalties,
                "summary": rc.summary,
                "losses": rc.get_regularization_losses,
            }[read]()
        out2 = model(x2)
        pen2 = rc.loss(model)
        total = (out1.pow(2).mean() + pen1 + out2.pow(2).mean() + pen2) / 2
        total.backward()
        return (pen1 + pen2).item(), grads(model)

    quiet, quiet_grads = run(log=False)
    logged, logged_grads = run(log=True)
    assert logged == quiet
    assert all(torch.equal(a, b) for a, b in zip(logged_grads, quiet_grads))
    # And both are the hand-written penalty of the two passes.
    o1, p1 = by_hand(twin, x1)
    o2, p2 = by_hand(twin, x2)
    ((o1.pow(2).mean() + p1 + o2.pow(2).mean() + p2) / 2).backward()
    assert quiet == pytest.approx((p1 + p2).item(), rel=1e-6)
    assert close(quiet_grads, grads(twin))


def test_reading_twice_returns_the_same_activity_penalty():
    model = relu_mlp()
    model(torch.ones(3, 4))
    first = [t.item() for t in rc.get_regularization_losses(model)]
    assert [t.item() for t in rc.get_regularization_losses(model)] == first
    assert rc.loss(model).item() == rc.loss(model).item() == pytest.approx(sum(first))


# -- validation never leaks into training ------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_validation_with_gradients_on_never_leaks_into_the_next_training_step(mode):
    """20 validation batches with gradients on (torch.no_grad() forgotten) and no rc.loss(),
    then a training step: its penalty and its gradient are those of the training pass."""
    torch.manual_seed(0)
    model = relu_mlp()
    twin = plain_twin(model)
    x = torch.randn(8, 4)
    getattr(model, mode)()
    for _ in range(20):
        model(100 * torch.randn(8, 4))  # large inputs: a leak would show
    model.train()
    out = model(x)
    penalty = rc.loss(model)
    (out.pow(2).mean() + penalty).backward()
    twin_out, want = by_hand(twin, x)
    (twin_out.pow(2).mean() + want).backward()
    assert penalty.item() == pytest.approx(want.item(), rel=1e-6)
    assert close(grads(model), grads(twin))


def test_validation_under_no_grad_between_forward_and_loss_keeps_the_training_pass():
    torch.manual_seed(0)
    model = relu_mlp()
    twin = plain_twin(model)
    x = torch.randn(8, 4)
    out = model(x)
    with torch.no_grad():
        model(100 * torch.randn(8, 4))  # e.g. an EMA or metric pass: records nothing
    assert rc.loss(model).item() == pytest.approx(by_hand(twin, x)[1].item(), rel=1e-6)
    out.sum()  # (the training graph is still there)


def test_a_validation_loss_taken_in_eval_mode_counts_the_validation_pass():
    torch.manual_seed(0)
    model = relu_mlp()
    twin = plain_twin(model)
    model.eval()
    x_val = torch.randn(5, 4)
    model(x_val)
    assert rc.loss(model).item() == pytest.approx(by_hand(twin, x_val)[1].item(), rel=1e-6)


# -- activation checkpointing ------------------------------------------------------------------


class Checkpointed(torch.nn.Module):
    """A model whose first block runs under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(
            rc.nn.Linear(4, 8, activity_regularizer=rc.l2(C)), torch.nn.Tanh()
        )
        self.head = torch.nn.Linear(8, 1)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("input_grad", [False, True])
def test_a_checkpointed_block_counts_once_with_its_gradient(input_grad):
    torch.manual_seed(0)
    plain = Checkpointed(None)
    ckpt = Checkpointed(False)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(6, 4, requires_grad=input_grad)
    values = []
    for model in (plain, ckpt):
        out = model(x)
        penalty = rc.loss(model)
        (out.pow(2).mean() + penalty).backward()
        values.append(penalty.item())
    hidden = plain.block[0](x)
    assert values[0] == values[1] == pytest.approx((C * (hidden**2).sum() / 6).item(), rel=1e-6)
    assert close(grads(plain), grads(ckpt))
    # The recomputation inside the backward recorded nothing: the pass is still one penalty.
    assert rc.loss(ckpt).item() == pytest.approx(values[1], rel=1e-6)


def test_reentrant_checkpointing_is_refused_by_name():
    model = Checkpointed(True)
    out = model(torch.randn(6, 4, requires_grad=True))
    total = out.sum() + rc.loss(model)
    with pytest.raises(RuntimeError, match=r"'block\.0:activity'.*use_reentrant=False"):
        total.backward()


# -- WGAN-GP -----------------------------------------------------------------------------------


def critic() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        rc.nn.Linear(2, 8, kernel_regularizer=rc.l2(0.01), activity_regularizer=rc.l2(C)),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 1),
    )


def test_wgan_gp_counts_the_pass_the_user_adds_the_penalty_after():
    """The critic runs on real and fake samples (one pass of both, as GAN code usually
    batches them), then on the interpolates whose input gradient is the gradient penalty
    (autograd.grad with create_graph=True). rc.loss(D) taken after the real/fake pass adds that
    pass's activity penalty with its gradient; the gradient-penalty pass changes nothing of
    it, and nothing warns. A read after the interpolates' pass is that pass's penalty."""
    torch.manual_seed(0)
    disc = critic()
    twin = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(disc.state_dict())
    real, fake, eps = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16, 1)
    x_hat = eps * real + (1 - eps) * fake

    def gradient_penalty(net, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        return ((g.norm(2, dim=1) - 1) ** 2).mean()

    scores = disc(torch.cat([real, fake]))
    penalty = rc.loss(disc)
    gp = gradient_penalty(disc, x_hat)
    d_loss = scores[16:].mean() - scores[:16].mean() + 10 * gp + penalty
    d_loss.backward()
    after_gp = rc.loss(disc).item()

    def act(x):
        h = twin[0](x)
        return C * (h**2).sum() / x.shape[0]

    weights = 0.01 * (twin[0].weight ** 2).sum()
    t_scores = twin(torch.cat([real, fake]))
    want_penalty = weights + act(torch.cat([real, fake]))
    want = t_scores[16:].mean() - t_scores[:16].mean() + 10 * gradient_penalty(twin, x_hat)
    (want + want_penalty).backward()
    assert penalty.item() == pytest.approx(want_penalty.item(), rel=1e-6)
    assert d_loss.item() == pytest.approx((want + want_penalty).item(), rel=1e-6)
    assert close(grads(disc), grads(twin), rtol=1e-5)
    assert after_gp == pytest.approx((weights + act(x_hat)).item(), rel=1e-6)


def test_a_gan_loop_with_one_penalty_per_model_counts_each_models_latest_pass():
    """The tutorial order: G forward, D step (D runs twice), G step (D runs again). rc.loss(G)
    is G's pass, rc.loss(D) D's latest, whatever ran in between; nothing warns."""
    torch.manual_seed(0)
    gen = torch.nn.Sequential(rc.nn.Linear(3, 2, activity_regularizer=rc.l1(0.1)))
    disc = critic()
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    for _ in range(3):
        z, real = torch.randn(8, 3), torch.randn(8, 2)
        fake = gen(z)
        want_g = 0.1 * fake.detach().abs().sum().item() / 8
        opt_d.zero_grad()
        d_fake = disc(fake.detach())
        d_real = disc(real)
        hidden = disc[0](real).detach()
        want_d = 0.01 * (disc[0].weight ** 2).sum().item() + C * (hidden**2).sum().item() / 8
        d_pen = rc.loss(disc)
        assert d_pen.item() == pytest.approx(want_d, rel=1e-6)
        (d_fake.mean() - d_real.mean() + d_pen).backward()
        opt_d.step()
        opt_g.zero_grad()
        g_pen = rc.loss(gen)
        assert g_pen.item() == pytest.approx(want_g, rel=1e-6)
        (-disc(fake).mean() + g_pen).backward()
        opt_g.step()


# -- gradient accumulation ---------------------------------------------------------------------


@pytest.mark.parametrize("backward", ["per_micro_batch", "once"])
def test_gradient_accumulation_gives_the_single_batch_numbers(backward):
    """Two micro-batches of 4 against one batch of 8: the accumulated gradient of
    (loss + rc.loss()) / 2 per micro-batch equals the single batch's loss + rc.loss()."""
    torch.manual_seed(0)
    model = relu_mlp()
    full = copy.deepcopy(model)
    x = torch.randn(8, 4)
    out = full(x)
    (out.pow(2).mean() + rc.loss(full)).backward()
    total = 0.0
    for xb in x.chunk(2):
        part = (model(xb).pow(2).mean() + rc.loss(model)) / 2
        if backward == "per_micro_batch":
            part.backward()
        total = total + part
    if backward == "once":
        total.backward()
    assert close(grads(model), grads(full))


# -- torch.compile, export and trace -----------------------------------------------------------


def test_a_compiled_step_gives_the_eager_numbers_with_an_eval_pass_in_between():
    """Five steps, each followed by an eager validation pass in eval mode with gradients on;
    the compiled step's losses and weights equal the eager step's."""
    torch.manual_seed(0)
    eager = relu_mlp()
    compiled = copy.deepcopy(eager)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5)]
    x_val = 10 * torch.randn(8, 4)

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x, y):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean() + rc.loss(model)
            loss.backward()
            return loss

        return opt, step

    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt, step = make_step(model)
        run = torch.compile(step) if name == "compiled" else step
        losses = []
        for x, y in data:
            model.train()
            losses.append(run(x, y).item())
            opt.step()
            model.eval()
            model(x_val)  # validation, no_grad forgotten
        results[name] = (losses, [p.detach().clone() for p in model.parameters()])
    assert results["compiled"][0] == pytest.approx(results["eager"][0], rel=5e-6)
    assert close(results["compiled"][1], results["eager"][1], rtol=5e-6)


def test_export_and_trace_leave_nothing_behind():
    torch.manual_seed(0)
    model = relu_mlp()
    twin = plain_twin(model)
    x = torch.randn(5, 4)
    model(x)
    before = rc.loss(model).item()
    torch.jit.trace(model, torch.randn(3, 4))
    assert rc.loss(model).item() == before  # what the last real pass recorded
    torch.export.export(model, (torch.randn(3, 4),))
    if EXPORT_IS_SEEN:
        assert rc.loss(model).item() == before
    else:  # torch 2.6: export ran the hooks as a compiled step would; nothing of it is read
        assert rc.loss(model).item() == 0.0
    out = model(x)
    penalty = rc.loss(model)
    (out.sum() + penalty).backward()
    assert penalty.item() == pytest.approx(by_hand(twin, x)[1].item(), rel=1e-6)


# -- loops without an optimizer, frozen layers ------------------------------------------------


def test_a_frozen_layer_fed_constants_adds_nothing_in_a_manual_update_loop():
    """Features from a frozen regularized layer, computed once; a head trained by hand.
    The frozen layer's activity penalty carries no gradient and trains nothing: like a frozen
    weight, it is not part of rc.loss()."""
    torch.manual_seed(0)
    frozen = rc.nn.Linear(4, 8, activity_regularizer=rc.l2(C)).requires_grad_(False)
    head = rc.nn.Linear(8, 1, kernel_regularizer=rc.l2(0.1))
    feats = frozen(torch.randn(6, 4))
    for _ in range(3):
        penalty = rc.loss()
        assert penalty.item() == pytest.approx(0.1 * (head.weight**2).sum().item(), rel=1e-6)
        (head(feats).pow(2).mean() + penalty).backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.1 * p.grad
                p.grad = None


def test_a_layer_called_several_times_in_one_pass_counts_every_call():
    """A shared block applied three times in one forward (weight sharing, ALBERT-style):
    three penalties, and the next pass replaces all three."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = rc.nn.Linear(4, 4, activity_regularizer=rc.l1(C))

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.cell(x))
            return x

    torch.manual_seed(0)
    model = Shared()
    plain = torch.nn.Linear(4, 4)
    plain.load_state_dict(model.cell.state_dict())
    for _ in range(2):
        x = torch.randn(5, 4)
        model(x)
        want, h = 0.0, x
        for _ in range(3):
            pre = plain(h)
            want += C * pre.abs().sum().item() / 5
            h = torch.tanh(pre)
        assert rc.loss(model).item() == pytest.approx(want, rel=1e-6)


def test_calling_a_submodule_alone_replaces_only_its_layers():
    """Keras's rule: an outermost call resets the layers of the module called."""
    torch.manual_seed(0)
    enc = rc.nn.Linear(4, 4, activity_regularizer=rc.l2(C))
    dec = rc.nn.Linear(4, 2, activity_regularizer=rc.l2(C))
    model = torch.nn.Sequential(enc, dec)
    x = torch.randn(3, 4)
    h = model[0](x)
    out = model(x)
    assert rc.loss(model).item() == pytest.approx(
        (C * (h**2).sum() / 3 + C * (out**2).sum() / 3).item(), rel=1e-6
    )
    x2 = torch.randn(3, 4)
    h2 = enc(x2)  # the encoder alone: its penalty is replaced, the decoder's stays
    assert rc.loss(model).item() == pytest.approx(
        (C * (h2**2).sum() / 3 + C * (out**2).sum() / 3).item(), rel=1e-6
    )


# -- schedules count real updates ---------------------------------------------------------------


class Wrapping(torch.optim.Optimizer):
    """A wrapper written as ZeroRedundancyOptimizer is: an optimizer over the parameters whose
    step() steps an inner one it keeps under a name of its own."""

    def __init__(self, params, lr):
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.local_optimizer = torch.optim.SGD(params, lr=lr)

    def step(self, closure=None):
        return self.local_optimizer.step(closure)


class Combined(torch.optim.Optimizer):
    """One step() over several optimizers (a Muon + AdamW split), with a placeholder group of
    its own, as containers of optimizers are often written."""

    def __init__(self, *optimizers):
        super().__init__([torch.nn.Parameter(torch.zeros(1))], {})
        self.parts = optimizers

    def step(self, closure=None):
        for part in self.parts:
            part.step()


def warmup_model(schedule):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    rc.regularize(model, kernel=rc.l2(schedule), bias=rc.l2(schedule))
    return model


def train(model, optimizers, steps, x=None):
    x = torch.randn(4, 3) if x is None else x
    for _ in range(steps):
        for opt in optimizers:
            opt.zero_grad()
        (model(x).pow(2).mean() + rc.loss(model)).backward()
        for opt in optimizers:
            opt.step()


@pytest.mark.parametrize("wrapper", ["Wrapping", "Combined"])
def test_a_schedule_advances_once_per_real_update_whatever_wraps_the_optimizer(wrapper):
    schedule = rc.schedules.warmup(0.1, steps=10)
    model = warmup_model(schedule)
    if wrapper == "Wrapping":
        opt = Wrapping(model.parameters(), lr=0.1)
    else:
        kernels = [model[0].weight, model[2].weight]
        biases = [model[0].bias, model[2].bias]
        opt = Combined(torch.optim.SGD(kernels, lr=0.1), torch.optim.Adam(biases, lr=0.1))
    train(model, [opt], 6)
    assert schedule.step == 6
    assert float(schedule) == pytest.approx(0.06)


def test_one_schedule_shared_by_a_gans_two_optimizers_advances_once_per_training_step():
    schedule = rc.schedules.warmup(0.1, steps=10)
    gen, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    rc.add_regularizer(gen, "weight", rc.l2(schedule))
    rc.add_regularizer(disc, "weight", rc.l2(schedule))
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    for _ in range(10):
        z = torch.randn(4, 2)
        opt_d.zero_grad()
        (disc(gen(z).detach()).mean() + rc.loss(disc)).backward()
        opt_d.step()
        opt_g.zero_grad()
        (-disc(gen(z)).mean() + rc.loss(gen)).backward()
        opt_g.step()
    assert schedule.step == 10  # a 10-step warm-up ends after 10 training steps, not 5


# -- resume --------------------------------------------------------------------------------------


def run_with_checkpoint(tmp_path, resume_call: bool):
    """4 steps straight, against 2 steps, a torch.save of model and optimizer, and 2 more steps
    in a model and an optimizer built afresh (what a new process does)."""
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    straight_schedule = rc.schedules.warmup(0.5, steps=4)
    straight = warmup_model(straight_schedule)
    init = copy.deepcopy(straight.state_dict())
    opt = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
    train(straight, [opt], 4, x)

    first = warmup_model(rc.schedules.warmup(0.5, steps=4))
    first.load_state_dict(init)
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    train(first, [opt], 2, x)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    rc.get_collection().remove(first)

    resumed_schedule = rc.schedules.warmup(0.5, steps=4)
    resumed = warmup_model(resumed_schedule)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ckpt["opt"])
    if resume_call:
        rc.schedules.resume(opt)
    train(resumed, [opt], 2, x)
    return straight, straight_schedule, resumed, resumed_schedule


def test_schedules_resume_with_the_optimizer_state(tmp_path):
    straight, s1, resumed, s2 = run_with_checkpoint(tmp_path, resume_call=True)
    assert s2.step == s1.step == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=4e-6, atol=1e-7)


def test_an_optimizer_first_seen_at_its_step_restores_its_schedules_and_says_so(tmp_path):
    with pytest.warns(rc.RegcollectWarning, match=r"schedules\.resume\(optimizer\)"):
        _, s1, _, s2 = run_with_checkpoint(tmp_path, resume_call=False)
    assert s2.step == s1.step == 4  # restored at the first step: the rest of the run is right


@pytest.mark.parametrize("decoupled", [False, True])
def test_an_attached_optimizer_restores_its_schedules_when_its_state_is_loaded(decoupled):
    """What ``rc.schedules.resume`` promises: an optimizer attached with
    ``rc.attach_optimizer`` is known, so loading its state restores the schedules at once,
    without a resume() call, and the first resumed loss() uses the resumed coefficient."""

    def build():
        schedule = rc.schedules.warmup(0.5, steps=10)
        model = warmup_model(schedule)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rc.attach_optimizer(opt, decoupled=decoupled)
        return schedule, model, opt

    schedule, model, opt = build()
    train(model, [opt], 3)
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    del model, opt
    schedule, model, opt = build()
    model.load_state_dict(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "first seen at its step" warning either
        opt.load_state_dict(state)
        assert schedule.step == 3
        expected = 0.5 * 3 / 10 * sum(float(p.detach().pow(2).sum()) for p in model.parameters())
        assert rc.loss(model).item() == pytest.approx(expected, rel=1e-6)
        train(model, [opt], 1)


def test_loading_an_earlier_optimizer_state_rolls_the_schedules_back():
    schedule = rc.schedules.warmup(0.5, steps=10)
    model = warmup_model(schedule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, [opt], 2)
    saved = copy.deepcopy(opt.state_dict())
    train(model, [opt], 3)
    assert schedule.step == 5
    opt.load_state_dict(saved)
    assert schedule.step == 2


# -- tied weights: one entry per tensor ---------------------------------------------------------


class TiedLM(torch.nn.Module):
    """An embedding and an output head sharing one weight (T5, GPT-2, BERT's MLM head)."""

    def __init__(self, emb_reg=None, head_reg=None):
        super().__init__()
        self.shared = rc.nn.Embedding(10, 4, embeddings_regularizer=emb_reg)
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = rc.nn.Linear(4, 10, bias=False, kernel_regularizer=head_reg)
        self.lm_head.weight = self.shared.weight

    def forward(self, tokens):
        return self.lm_head(self.body(self.shared(tokens)))


def test_a_tied_weight_with_two_different_regularizers_is_refused_naming_both_layers():
    model = TiedLM(emb_reg=rc.l2(0.1), head_reg=rc.l1(0.2))  # declared, then tied
    with pytest.raises(ValueError, match=r"'shared\.weight' and 'lm_head\.weight' are one tensor"):
        rc.loss(model)
    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    plain[1].weight = plain[0].weight
    rc.add_regularizer(plain, "0.weight", rc.l2(0.1))
    with pytest.raises(
        ValueError,
        match=r"'0\.weight' and '1\.weight' are one tensor.*L2\(l2=0\.1\).*L1\(l1=0\.2\)",
    ):
        rc.add_regularizer(plain, "1.weight", rc.l1(0.2))
    # rc.regularize sees each tensor once, by its first path (as named_parameters()): the
    # tied weight is the embedding's, and takes the embeddings rule, replacing L2(0.1).
    handle = rc.regularize(plain, kernel=rc.l2(1e-4), embeddings=rc.l2(1e-5))
    assert [(e.name, e.regularizer) for e in handle.entries] == [("0.weight", rc.l2(1e-5))]


def test_a_tied_weight_is_named_as_named_parameters_names_it():
    model = TiedLM()
    handle = rc.regularize(model, kernel=rc.l2(0.1), embeddings=rc.l2(0.1))
    names = {e.name for e in handle.entries}
    assert names == {"shared.weight", "body.weight"}  # not lm_head.weight
    assert names <= set(dict(model.named_parameters()))
    want = 0.1 * ((model.shared.weight**2).sum() + (model.body.weight**2).sum())
    assert rc.loss(model).item() == pytest.approx(want.item(), rel=1e-6)
    assert set(rc.penalties(model)) == names | {"total"}


def test_hf_t5_tied_weights_are_named_as_its_trainer_names_them(tiny_hf_models):
    transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
    from regcollect.integrations.transformers import regularize

    model, _ = tiny_hf_models(transformers)["t5"]
    coll = rc.Collection()
    handle = regularize(model, rc.l2(0.1), collection=coll)
    names = {e.name for e in handle.entries}
    assert names <= set(dict(model.named_parameters()))
    assert "lm_head.weight" not in names


# -- frozen parameters in the attached step -----------------------------------------------------


@pytest.mark.parametrize("decoupled", [False, True])
def test_a_frozen_weight_is_not_moved_by_the_attached_step(decoupled):
    """Fine-tuning that freezes a layer after some steps, with zero_grad(set_to_none=False):
    the frozen weight keeps a zero .grad, and the attached step must leave it alone, as
    rc.loss() and the summary do (frozen parameters contribute nothing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(0.5)), rc.nn.Linear(3, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rc.attach_optimizer(opt, decoupled=decoupled)
    x = torch.randn(4, 3)
    for step in range(4):
        if step == 2:
            model[0].weight.requires_grad_(False)
            frozen = model[0].weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        (model(x).pow(2).mean() + rc.loss()).backward()
        opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert "0.weight" not in {k for k, v in rc.penalties().items() if v}


# -- untrusted plans: strict and bounded --------------------------------------------------------


def plan_of(**changes):
    plan = {
        "format": "regcollect.plan",
        "version": 1,
        "entries": [
            {
                "module": "0",
                "param": "weight",
                "scope": "",
                "regularizer": {"class_name": "L2", "config": {"l2": 0.1}},
            }
        ],
    }
    plan.update(changes)
    return plan


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_plan_version_must_be_the_integer_1(version):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="version 1"):
        rc.load_plan(model, plan_of(version=version), collection=rc.Collection())


@pytest.mark.parametrize(
    "where",
    ["class_name", "config", "module", "param", "scope", "format", "regularizer", "identifier"],
)
def test_an_error_about_a_huge_value_shows_a_bounded_part_of_it(where):
    """A 50 MB string in an untrusted plan (or given to regularizers.get) is never echoed
    whole into the error: the message says how long it was."""
    huge = "A" * 50_000_000
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    plan = plan_of()
    entry = plan["entries"][0]
    if where == "class_name":
        entry["regularizer"]["class_name"] = huge
    elif where == "config":
        entry["regularizer"]["config"] = {"l2": huge}
    elif where == "regularizer":
        entry["regularizer"] = huge
    elif where == "format":
        plan["format"] = huge
    elif where in ("module", "param", "scope"):
        entry[where] = huge
    with pytest.raises((TypeError, ValueError)) as info:
        if where == "identifier":
            rc.regularizers.get(huge)
        else:
            rc.load_plan(model, plan, collection=rc.Collection())
    message = str(info.value)
    assert len(message) < 2_000, len(message)
    assert "50000000 characters" in message


# -- fork safety ----------------------------------------------------------------------------------

_FORK_SCRIPT = r"""
import sys, threading
import torch
import regcollect as rc
from regcollect._collection import registry as _registry

where = sys.argv[1]
inside, release = threading.Event(), threading.Event()
blocked = _registry.Registry._in_scope if where == "loss" else _registry.Registry._changed

def hold(self, *args):
    # Another thread caught inside rc.loss() (a plan build) or a registration, holding its
    # collection's lock, at the moment the DataLoader forks its workers.
    if threading.current_thread().name == "busy":
        inside.set()
        release.wait()
    return blocked(self, *args)

setattr(_registry.Registry, "_in_scope" if where == "loss" else "_changed", hold)
model = torch.nn.Sequential(rc.nn.Linear(4, 4, kernel_regularizer=rc.l2(0.1)))

def busy():
    if where == "loss":
        rc.loss(model)
    else:
        rc.nn.Linear(4, 4, kernel_regularizer=rc.l2(0.1))

thread = threading.Thread(target=busy, name="busy", daemon=True)
thread.start()
inside.wait()

class Data(torch.utils.data.Dataset):
    # Each item builds a regularized layer and reads its penalty: a worker touching
    # regcollect (any nn.Module built there runs regcollect's module-registration hook too).
    def __len__(self):
        return 4
    def __getitem__(self, i):
        layer = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)))
        return rc.loss(layer).detach() - (layer[0].weight ** 2).sum().detach()

loader = torch.utils.data.DataLoader(
    Data(), batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=20
)
try:
    values = torch.cat(list(loader))  # a worker stuck on a lock: RuntimeError after 20 s
finally:
    release.set()
thread.join()
assert values.abs().max().item() < 1e-6, values
print("ok", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loss", "registration"])
def test_dataloader_workers_forked_while_another_thread_is_inside_regcollect(where, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "fork_case.py"
    script.write_text(_FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), where], capture_output=True, text=True, timeout=90
    )
    assert "ok" in result.stdout, result.stderr[-3000:]


# -- L2-SP on resume ------------------------------------------------------------------------------


def finetune_run(tmp_path):
    """A fine-tuning run with L2-SP: pretrained weights, 3 steps, a checkpoint. Returns the
    pretrained state, the checkpoint's path and the penalty at the end."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    pretrained = copy.deepcopy(net.state_dict())
    coll = rc.Collection()
    rc.regularize(net, kernel=rc.l2sp(1.0), collection=coll)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        (net(x).pow(2).mean() + coll.loss()).backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "finetune.pt")
    torch.save(net, tmp_path / "finetune_model.pt")
    return pretrained, coll.loss().item()


def fresh_net(pretrained):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net.load_state_dict(pretrained)
    return net


def test_l2sp_resumed_by_loading_after_regularize_keeps_the_pretrained_reference(tmp_path):
    pretrained, want = finetune_run(tmp_path)
    assert want > 1e-3
    net = fresh_net(pretrained)  # the pretrained model, as the run started
    coll = rc.Collection()
    rc.regularize(net, kernel=rc.l2sp(1.0), collection=coll)
    net.load_state_dict(torch.load(tmp_path / "finetune.pt"))  # reference buffers included
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


def test_l2sp_a_reference_buffer_present_in_the_module_wins(tmp_path):
    _, want = finetune_run(tmp_path)
    net = torch.load(tmp_path / "finetune_model.pt", weights_only=False)  # a whole model
    coll = rc.Collection()
    rc.regularize(net, kernel=rc.l2sp(1.0), collection=coll)
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


def test_l2sp_resumed_with_strict_false_before_regularize_takes_the_checkpoint_as_reference(
    tmp_path,
):
    """torch's load_state_dict(strict=False) drops the checkpoint's reference buffers when the
    model has none yet (regularize comes after): pass the checkpoint as the reference, and
    regularize takes each parameter's saved reference from it."""
    pretrained, want = finetune_run(tmp_path)
    net = fresh_net(pretrained)
    ckpt = torch.load(tmp_path / "finetune.pt")
    dropped = net.load_state_dict(ckpt, strict=False).unexpected_keys
    assert dropped == ["0.weight_l2sp_reference", "2.weight_l2sp_reference"]
    coll = rc.Collection()
    rc.regularize(net, kernel=rc.l2sp(1.0, reference=ckpt), collection=coll)
    assert coll.loss().item() == pytest.approx(want, rel=1e-6)


# -- found by trying it as users do (review) ------------------------------------------------------


class Recurrent(torch.nn.Module):
    """A cell applied at every time step: one layer, k calls per pass."""

    def __init__(self):
        super().__init__()
        self.cell = rc.nn.Linear(4, 4, activity_regularizer=rc.l2(C))

    def forward(self, xs):
        h = torch.zeros(xs.shape[1], 4)
        for x in xs:
            h = torch.tanh(self.cell(x + h))
        return h


def recurrent_penalty(model, xs):
    plain = torch.nn.Linear(4, 4)
    plain.load_state_dict(model.cell.state_dict())
    h, want = torch.zeros(xs.shape[1], 4), 0.0
    for x in xs:
        pre = plain(x + h)
        want += C * (pre**2).sum().item() / xs.shape[1]
        h = torch.tanh(pre)
    return want


@pytest.mark.parametrize("copy_with", ["deepcopy", "torch.load"])
def test_a_copied_model_counts_every_call_of_its_layers_from_its_first_pass(copy_with, tmp_path):
    torch.manual_seed(0)
    model = Recurrent()
    if copy_with == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    xs = torch.randn(5, 3, 4)
    copied(xs)
    assert rc.loss(copied).item() == pytest.approx(recurrent_penalty(copied, xs), rel=1e-6)


def test_a_module_calling_itself_counts_every_call():
    class Repeat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = rc.nn.Linear(3, 3, activity_regularizer=rc.l2(C))

        def forward(self, x, depth=2):
            x = self.lin(x)
            return self(x, depth - 1) if depth > 0 else x

    torch.manual_seed(0)
    model = Repeat()
    plain = torch.nn.Linear(3, 3)
    plain.load_state_dict(model.lin.state_dict())
    x = torch.randn(4, 3)
    model(x)
    want, h = 0.0, x
    for _ in range(3):
        h = plain(h)
        want += C * (h**2).sum().item() / 4
    assert rc.loss(model).item() == pytest.approx(want, rel=1e-6)


def test_a_validation_loss_under_no_grad_has_no_stale_training_penalty():
    """model.eval(); with torch.no_grad(): val = crit(model(x)) + rc.loss(model): nothing
    is recorded under no_grad, and the training pass's penalty is not the validation's."""
    torch.manual_seed(0)
    model = relu_mlp()
    out = model(10 * torch.randn(8, 4))
    (out.pow(2).mean() + rc.loss(model)).backward()
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 4))
        val_penalty = rc.loss(model).item()
    assert val_penalty == 0.0  # no weight penalty on this model, no activity recorded


def test_reentrant_checkpointing_of_segments_is_refused_by_name():
    """checkpoint_sequential(..., use_reentrant=True) calls the segments itself, outside the
    model's own call, after a normal step: still the clear error, never last step's penalty."""
    from torch.utils.checkpoint import checkpoint_sequential

    torch.manual_seed(0)
    model = relu_mlp()
    x = torch.randn(6, 4, requires_grad=True)
    (model(x).pow(2).mean() + rc.loss(model)).backward()  # a normal step first
    out = checkpoint_sequential(model, 2, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match=r"'0:activity'.*use_reentrant=False"):
        (out.pow(2).mean() + rc.loss(model)).backward()


def test_many_activity_regularizers_in_nested_containers_each_count_once():
    """300 layers with activity regularizers, each in a Sequential of its own (the hooks are
    placed once for all at the first forward pass; benchmarks/bench_activity.py times it)."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(
        *[
            torch.nn.Sequential(rc.nn.Linear(2, 2, activity_regularizer=rc.l2(C)))
            for _ in range(300)
        ]
    )
    x = torch.randn(1, 2)
    blocks(x)
    want, h = 0.0, x
    for block in blocks:
        plain = torch.nn.Linear(2, 2)
        plain.load_state_dict(block[0].state_dict())
        h = plain(h)
        want += C * (h**2).sum().item()
    assert rc.loss(blocks).item() == pytest.approx(want, rel=1e-5)
    assert len(rc.get_regularization_losses(blocks)) == 300


def test_an_optimizer_step_that_raised_does_not_freeze_another_optimizers_schedule():
    schedule = rc.schedules.warmup(0.1, steps=100)
    gen = rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(schedule))
    disc = torch.nn.Linear(3, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    x = torch.randn(4, 3)

    def g_step():
        opt_g.zero_grad()
        (disc(gen(x)).mean() + rc.loss(gen)).backward()
        opt_g.step()

    for _ in range(3):
        g_step()

    def failing_closure():
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        opt_d.step(failing_closure)
    for _ in range(5):
        g_step()
    assert schedule.step == 8


def test_fx_symbolic_trace_records_nothing():
    torch.manual_seed(0)
    model = relu_mlp()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    assert torch.equal(traced(x), model(x))


def test_a_dict_output_is_regularized_on_its_first_tensor():
    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x), "extra": x}

    model = Dict()
    rc.add_activity_regularizer(model, rc.l2(C))
    out = model(torch.randn(4, 3))
    assert rc.loss(model).item() == pytest.approx(
        (C * (out["logits"] ** 2).sum() / 4).item(), rel=1e-6
    )


def test_a_shallow_copy_of_a_layer_is_refused_not_counted_in_the_original():
    """copy.copy (as nn.DataParallel's replicas are made) shares the layer's hooks: its calls
    would land in the original's penalty. A clear error instead of a wrong number."""
    layer = rc.nn.Linear(3, 3, activity_regularizer=rc.l2(C))
    twin = copy.copy(layer)
    with pytest.raises(RuntimeError, match=r"copy of .*DistributedDataParallel"):
        twin(torch.randn(2, 3))
