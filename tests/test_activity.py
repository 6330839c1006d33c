"""Activity penalties in the training loop: GANs, threads, validation, accumulation and
memory, each written as a user would write the loop (more loops in test_loops.py)."""

import gc
import os
import warnings

import pytest
import torch

import regcollect as rc


def bce(logits, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def test_gan_in_tutorial_order_with_per_model_losses():
    torch.manual_seed(0)
    gen = torch.nn.Sequential(
        rc.nn.Linear(4, 8, activity_regularizer=rc.l2(0.01)), torch.nn.Tanh(), rc.nn.Linear(8, 2)
    )
    disc = torch.nn.Sequential(
        rc.nn.Linear(2, 8, kernel_regularizer=rc.l2(0.05)),
        torch.nn.LeakyReLU(0.2),
        rc.nn.Linear(8, 1, kernel_regularizer=rc.l1(0.01)),
    )
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
    ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
    for _ in range(3):
        z, real = torch.randn(16, 4), torch.randn(16, 2)
        fake = gen(z)  # records the generator's activity penalty
        with torch.no_grad():
            hidden = gen[0](z)
            want_g = 0.01 * (hidden**2).sum() / 16
            want_d = 0.05 * (disc[0].weight ** 2).sum() + 0.01 * disc[2].weight.abs().sum()
        # Discriminator step: its own penalties only; the generator's record stays pending.
        opt_d.zero_grad()
        d_pen = rc.loss(disc)
        assert d_pen.item() == pytest.approx(want_d.item(), rel=1e-6)
        (bce(disc(real), ones) + bce(disc(fake.detach()), zeros) + d_pen).backward()
        opt_d.step()
        # Generator step: takes the activity penalty of the pass that made `fake`.
        opt_g.zero_grad()
        g_pen = rc.loss(gen)
        assert g_pen.item() == pytest.approx(want_g.item(), rel=1e-6)
        (bce(disc(fake), ones) + g_pen).backward()
        opt_g.step()
    assert set(rc.penalties(gen)) == {"0:activity", "total"}
    assert set(rc.penalties(disc)) == {"0.weight", "2.weight", "total"}


def test_gan_penalty_gradient_equals_the_hand_written_one():
    gen = rc.nn.Linear(3, 5, activity_regularizer=rc.l1(0.1))
    plain = torch.nn.Linear(3, 5)
    plain.load_state_dict(gen.state_dict())
    z = torch.randn(6, 3)
    gen(z)
    rc.loss(gen).backward()
    (0.1 * plain(z).abs().sum() / 6).backward()
    assert torch.allclose(gen.weight.grad, plain.weight.grad, atol=1e-7)


def test_unscoped_loss_over_two_models_warns_once_naming_them():
    student = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)))
    stale = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)))
    with pytest.warns(
        rc.RegcollectWarning, match=r"2 separate models: Sequential .*rc\.loss\(model\)"
    ):
        both = rc.loss()
    want = (student[0].weight ** 2).sum() + (stale[0].weight ** 2).sum()
    assert both.item() == pytest.approx(want.item(), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc.loss()  # once
        assert rc.loss(student).item() == pytest.approx((student[0].weight ** 2).sum().item())
    assert set(rc.penalties(student)) == {"0.weight", "total"}  # plain names for the model passed


def test_one_model_per_thread_on_the_default_collection(run_in_threads):
    results = {}

    def work(k):
        torch.manual_seed(k)
        model = torch.nn.Sequential(
            rc.nn.Linear(
                4, 4, kernel_regularizer=rc.l2(0.1 * (k + 1)), activity_regularizer=rc.l1(0.01)
            )
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(20):
            x = torch.randn(8, 4)
            out = model(x)
            with torch.no_grad():
                want = 0.1 * (k + 1) * (model[0].weight ** 2).sum() + 0.01 * out.abs().sum() / 8
            penalty = rc.loss(model)
            results.setdefault(k, []).append((penalty.item(), want.item()))
            opt.zero_grad()
            (out.pow(2).mean() + penalty).backward()
            opt.step()

    run_in_threads(work, 8)
    for k in range(8):
        assert len(results[k]) == 20
        for got, want in results[k]:
            assert got == pytest.approx(want, rel=1e-5)


def test_validation_without_no_grad_does_not_leak_into_training():
    model = torch.nn.Sequential(rc.nn.Linear(3, 3, activity_regularizer=rc.l2(1.0)))
    x, x_val = torch.randn(4, 3), 100 * torch.randn(50, 3)
    model.eval()
    model(x_val)  # a validation pass with gradients on
    model.train()
    out = model(x)
    want = (out**2).sum() / 4
    assert rc.loss(model).item() == pytest.approx(want.item(), rel=1e-6)
    # A loss taken while still in eval mode (a validation loss) does count its pass.
    model.eval()
    val_out = model(x_val)
    assert rc.loss(model).item() == pytest.approx(((val_out**2).sum() / 50).item(), rel=1e-6)


def test_gradient_accumulation_with_loss_on_the_last_micro_batch_only():
    """rc.loss() added once per accumulated step: the weights once, and the activity penalty
    of the pass it follows (the last micro-batch's), as Keras's model.losses would hold."""
    model = torch.nn.Sequential(
        rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.1), activity_regularizer=rc.l1(0.5))
    )
    batches = [torch.randn(4, 3) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, x in enumerate(batches):
            out = model(x)
            loss = out.pow(2).mean() / 4
            if i == 3:
                penalty = rc.loss(model)
                want = 0.1 * (model[0].weight ** 2).sum() + 0.5 * out.abs().sum() / 4
                assert penalty.item() == pytest.approx(want.item(), rel=1e-6)
                loss = loss + penalty
            loss.backward()  # no "backward through the graph a second time"


def test_gradient_accumulation_with_loss_on_every_micro_batch():
    model = torch.nn.Sequential(rc.nn.Linear(3, 2, activity_regularizer=rc.l1(0.5)))
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(model[0].state_dict())
    batches = [torch.randn(4, 3) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in batches:
            (model(x).pow(2).mean() / 3 + rc.loss(model) / 3).backward()
    for x in batches:
        out = plain(x)
        (out.pow(2).mean() / 3 + 0.5 * out.abs().sum() / 4 / 3).backward()
    assert torch.allclose(model[0].weight.grad, plain.weight.grad, atol=1e-6)


def rss() -> int:
    """Resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_forward_backward_without_loss_keeps_no_memory():
    layer = torch.nn.Sequential(rc.nn.Linear(16, 1024, activity_regularizer=rc.l2(1e-4)))
    x = torch.randn(256, 16)

    def step():
        out = layer(x)  # 1 MiB of output per pass
        out.mean().backward()

    for _ in range(50):
        step()
    gc.collect()
    before = rss()
    for _ in range(600):
        step()
    gc.collect()
    grown = rss() - before
    assert grown < 64 * 2**20, grown / 2**20  # each pass replaced the one before


def test_averaged_model_copy_is_named_and_left_out():
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    swa = AveragedModel(model)  # a deep copy: its layers register too
    with pytest.warns(rc.RegcollectWarning, match="separate models"):
        doubled = rc.loss()
    single = (model[0].weight ** 2).sum()
    assert doubled.item() == pytest.approx(2 * single.item(), rel=1e-6)
    assert rc.loss(model).item() == pytest.approx(single.item(), rel=1e-6)
    assert set(rc.penalties(model)) == {"0.weight", "total"}
    assert swa.module[0].weight.grad is None


def test_reading_the_penalties_leaves_them_for_the_loss():
    """Keras's model.losses and TF1's collections have no side effects when read: logging
    the list, then adding rc.loss() to the training loss, trains the activity penalty."""
    layer = rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.1), activity_regularizer=rc.l2(0.5))
    x = torch.randn(4, 3)
    out = layer(x)
    kernel = 0.1 * (layer.weight.detach() ** 2).sum().item()
    activity = 0.5 * (out.detach() ** 2).sum().item() / 4
    logged = sum(rc.get_regularization_losses()).item()
    listed = [t.item() for t in rc.get_collection().losses()]
    first, second = rc.loss().item(), rc.loss().item()
    assert logged == pytest.approx(kernel + activity, rel=1e-6)
    assert sorted(listed) == pytest.approx(sorted([kernel, activity]), rel=1e-6)
    assert first == second == pytest.approx(kernel + activity, rel=1e-6)
    total = out.sum() + rc.loss()
    total.backward()
    # The activity penalty reached the weights: its gradient is in layer.weight.grad.
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(layer.state_dict())
    y = plain(x)
    (y.sum() + 0.1 * (plain.weight**2).sum() + 0.5 * (y**2).sum() / 4).backward()
    assert torch.allclose(layer.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-7)
    # Read after the backward (for a log line): still that pass, until the next one.
    assert rc.loss().item() == pytest.approx(kernel + activity, rel=1e-6)
    layer(torch.zeros(4, 3))  # the next pass: every output row is the bias
    assert rc.loss().item() == pytest.approx(kernel + 0.5 * (layer.bias**2).sum().item(), rel=1e-6)


def test_a_validation_loop_with_gradients_on_reads_each_pass_once():
    layer = rc.nn.Linear(3, 2, activity_regularizer=rc.l2(0.5))
    layer.eval()  # validation, but torch.no_grad() forgotten: the passes are recorded
    values = []
    for _ in range(3):
        out = layer(torch.ones(4, 3))
        values.append(rc.loss().item())  # printed, never backpropagated
    want = 0.5 * (out.detach() ** 2).sum().item() / 4
    assert values == pytest.approx([want] * 3, rel=1e-6)  # each pass once, never summed up


def test_an_activity_only_model_that_never_calls_loss_is_warned():
    model = torch.nn.Sequential(rc.nn.Linear(3, 2, activity_regularizer=rc.l2(0.5)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(rc.RegcollectWarning, match=r"0:activity.*step\(\) ran before rc.loss\(\)"):
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(4, 3)).sum().backward()  # rc.loss() forgotten
            opt.step()


@pytest.mark.parametrize("wrap", ["layer", "encoder"])
def test_sequence_first_transformers_divide_by_the_batch_size(wrap):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0)
    module = layer if wrap == "layer" else torch.nn.TransformerEncoder(layer, num_layers=1)
    coll = rc.Collection()
    rc.add_activity_regularizer(module, rc.l2(1.0), collection=coll)
    x = torch.randn(5, 3, 4)  # (sequence, batch, features): batch_first=False, the default
    out = module(x)
    assert coll.loss().item() == pytest.approx((out.detach() ** 2).sum().item() / 3, rel=1e-6)
