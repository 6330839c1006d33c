"""Coefficient schedules: shapes, stepping with optimizers, compile, summary."""

from __future__ import annotations

import math

import pytest
import torch

import regcollect as rc
from regcollect import schedules
from regcollect._torch_compat import COMPILED_LOSS_WITHOUT_GRAPH_BREAKS


def test_shapes_follow_their_formulas():
    lin = schedules.linear(1.0, 3.0, steps=4, delay=2)
    assert [lin.value(t) for t in range(8)] == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    warm = schedules.warmup(0.1, steps=10)
    assert warm.value(0) == 0.0 and warm.value(5) == pytest.approx(0.05) and warm.value(99) == 0.1
    cos = schedules.cosine(1.0, 0.0, steps=10)
    for t in (0, 3, 10, 12):
        expected = 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10))
        assert cos.value(t) == pytest.approx(expected, abs=1e-15)
    fn = schedules.FunctionSchedule(lambda step: 0.5**step)
    fn.set_step(3)
    assert float(fn) == 0.125


def test_bad_schedules_name_the_argument():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        schedules.linear(0.0, 1.0, steps=0)
    with pytest.raises(ValueError, match="end must be a non-negative finite real number"):
        schedules.cosine(1.0, -1.0, steps=3)
    bad = schedules.FunctionSchedule(lambda step: -1.0)
    with pytest.raises(ValueError, match=r"value of FunctionSchedule.*at step 0.*got -1.0"):
        rc.l2(bad)(torch.ones(2))
    with pytest.raises(ValueError, match='a schedule must be {"class_name"'):
        rc.l2({"class_name": "Nope", "config": {}})


def test_a_scheduled_l2_follows_the_optimizer_steps():
    layer = torch.nn.Linear(3, 2)
    sched = schedules.linear(0.0, 1.0, steps=4)
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.l2(sched), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for c in (0, 0.25, 0.5, 0.75, 1, 1):  # the schedule's value at steps 0 to 5
        opt.zero_grad()
        w = layer.weight.detach().clone()
        penalty = coll.loss()
        assert penalty.item() == pytest.approx(c * (w.double() ** 2).sum().item(), rel=1e-6)
        ((layer(torch.ones(1, 3)) ** 2).sum() + penalty).backward()
        x_grad = 2 * (layer(torch.ones(1, 3)).detach().T @ torch.ones(1, 3))
        # The gradient uses the current coefficient too.
        torch.testing.assert_close(layer.weight.grad, x_grad + 2 * c * w)
        opt.step()
    assert sched.step == 6


def test_each_optimizer_drives_the_schedules_of_its_own_parameters():
    gen, disc = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    s_gen, s_disc = schedules.linear(0.0, 1.0, 10), schedules.linear(0.0, 1.0, 10)
    coll = rc.Collection()
    rc.add_regularizer(gen, "weight", rc.l2(s_gen), collection=coll)
    rc.add_regularizer(disc, "weight", rc.L1L2(l1=s_disc, l2=s_disc), collection=coll)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    coll.loss([gen, disc])
    for _ in range(3):
        opt_d.step()  # two discriminator steps per generator step, as GANs often do
        opt_d.step()
        opt_g.step()
    assert (s_gen.step, s_disc.step) == (3, 6)  # L1L2's two coefficients: advanced once


def test_activity_and_orthogonal_coefficients_follow_schedules_too():
    layer = torch.nn.Linear(3, 4)
    sched = schedules.linear(1.0, 3.0, steps=2)
    coll = rc.Collection()
    rc.add_activity_regularizer(layer, rc.l2(sched), collection=coll)
    rc.add_regularizer(layer, "weight", rc.Orthogonal(sched, mode="outputs"), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    x = torch.randn(2, 3)
    out = layer(x)
    first = coll.loss().item()
    opt.step()
    layer(x)
    second = coll.loss().item()
    activity = (out.detach() ** 2).sum().item() / 2
    ortho = rc.Orthogonal(1.0, mode="outputs")(layer.weight).item()
    assert first == pytest.approx(1.0 * (activity + ortho), rel=1e-6)
    assert second == pytest.approx(2.0 * (activity + ortho), rel=1e-6)


def test_compiled_loss_follows_the_schedule_without_break_or_recompile():
    import torch._dynamo

    layer = torch.nn.Linear(3, 2)
    sched = schedules.cosine(1.0, 0.0, steps=4)
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.l2(sched), collection=coll)
    square = (layer.weight.detach() ** 2).sum().item()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda: coll.loss(), backend="eager", fullgraph=COMPILED_LOSS_WITHOUT_GRAPH_BREAKS
    )
    compiled(), compiled()  # the first call leaves state the second one's guards see
    values = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(5):
            sched.set_step(step)
            values.append(compiled().item())
    assert values == pytest.approx([sched.value(t) * square for t in range(5)], rel=1e-6)


def test_compiled_step_with_a_scheduled_activity_penalty_has_no_graph_break():
    """The schedule's coefficient tensor of an activity entry is made at registration (on the
    layer's device), as a weight entry's is, not by the first trace (whose lock broke the
    graph into four for good)."""
    import torch._dynamo

    sched = schedules.linear(0.0, 1e-3, steps=4)
    coll = rc.Collection()
    layer = rc.nn.Linear(4, 1, activity_regularizer=rc.l1(sched), collection=coll)
    x = torch.ones(2, 4)

    def step():
        return layer(x).sum() + coll.loss()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=COMPILED_LOSS_WITHOUT_GRAPH_BREAKS)
    for t in range(3):
        sched.set_step(t)
        got = compiled().item()  # the first call traces before any eager forward pass
        with torch.no_grad():
            out = layer(x)
        expected = out.sum() + sched.value(t) * out.abs().sum() / 2
        assert got == pytest.approx(expected.item(), rel=1e-6)


def test_summary_shows_the_current_coefficient_and_resume_restores_it():
    layer = rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(schedules.warmup(0.01, steps=4)))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        rc.loss().backward()
        opt.step()
    sched = layer.kernel_regularizer.l2
    rc.loss()
    table = rc.summary(file=open("/dev/null", "w"))
    assert "L2(l2=0.0075 linear@3)" in table  # the current value, kind and step
    state = sched.state_dict()
    assert state == {"step": 3}
    fresh = schedules.warmup(0.01, steps=4)
    fresh.load_state_dict(state)
    assert float(fresh) == pytest.approx(0.0075)


def test_schedules_serialise_inside_regularizers():
    reg = rc.L1L2(l1=schedules.linear(0.0, 1e-3, steps=100), l2=1e-4)
    data = rc.serialize(reg)
    assert data["config"]["l1"] == {
        "class_name": "LinearSchedule",
        "config": {"start": 0.0, "end": 1e-3, "steps": 100, "delay": 0},
    }
    back = rc.deserialize(data)
    assert back.l1.value(50) == pytest.approx(5e-4) and back.l2 == 1e-4
    with pytest.raises(NotImplementedError, match="cannot be serialised"):
        rc.serialize(rc.l2(lambda step: 0.1))


def test_attached_optimizer_applies_the_coefficient_of_the_step():
    layer = torch.nn.Linear(2, 2, bias=False)
    sched = schedules.linear(0.1, 0.2, steps=1)
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.l1(sched), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [0.05, 0.5]]))
    for expected in ([[0.9, -0.9], [0.0, 0.4]], [[0.7, -0.7], [0.0, 0.2]]):
        layer.weight.grad = torch.zeros(2, 2)
        opt.step()  # soft-threshold by lr * l1 at this step: 0.1, then 0.2
        torch.testing.assert_close(layer.weight.detach(), torch.tensor(expected))
