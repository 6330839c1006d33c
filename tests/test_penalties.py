"""Generic tests over the table of penalties (``tests/penalties.py``): every penalty's value
and gradient against its formula, through a collection as through a direct call, its config
and pickle round trips, and the attached optimizer step against the loss path."""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch

import regcollect as rc

sys.path.insert(0, str(Path(__file__).parent))

from penalties import PENALTIES, PenaltyInfo

EPS32 = torch.finfo(torch.float32).eps
ids = [p.name for p in PENALTIES]


def sample(info: PenaltyInfo, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(info.name))
    return torch.randn(info.shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("info", PENALTIES, ids=ids)
def test_a_direct_call_gives_the_formula_and_its_gradient(info):
    x = sample(info).requires_grad_(True)
    reg = info.make()
    torch.testing.assert_close(reg(x), info.formula(x), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(reg, (x,))


@pytest.mark.parametrize("info", PENALTIES, ids=ids)
def test_loss_of_a_registered_tensor_gives_the_formula_and_its_gradient(info):
    coll = rc.Collection()
    x = sample(info, torch.float32).requires_grad_(True)
    coll.register_tensor(x, info.make(), name="x")
    value = coll.loss()
    value.backward()
    reference = x.detach().double().requires_grad_(True)
    want = info.formula(reference)
    want.backward()
    # float32 sums of n terms: n ulps of the result, a few more for the norms' square roots.
    n = x.numel()
    torch.testing.assert_close(value.double(), want, rtol=4 * n * EPS32, atol=0)
    torch.testing.assert_close(x.grad.double(), reference.grad, rtol=4 * n * EPS32, atol=1e-7)
    assert coll.penalties()["x"] == pytest.approx(want.item(), rel=4 * n * EPS32)


@pytest.mark.parametrize("info", [p for p in PENALTIES if p.serializable], ids=lambda p: p.name)
def test_config_and_serialize_round_trips_give_an_equal_penalty(info):
    reg = info.make()
    assert type(reg).from_config(reg.get_config()).get_config() == reg.get_config()
    again = rc.deserialize(rc.serialize(reg))
    assert type(again) is type(reg) and again.get_config() == reg.get_config()
    if info.config_is_whole:
        x = sample(info)
        assert torch.equal(again(x), reg(x))


@pytest.mark.parametrize("info", PENALTIES, ids=ids)
def test_a_pickled_or_copied_penalty_gives_the_same_value(info):
    reg = info.make()
    x = sample(info)
    copies = [copy.deepcopy(reg)]
    if info.serializable:
        copies.append(pickle.loads(pickle.dumps(reg)))
    for other in copies:
        assert torch.equal(other(x), reg(x))


def _train(info: PenaltyInfo, attach: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    coll = rc.Collection()
    rc.add_regularizer(model, "weight", info.make(), collection=coll)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if attach:
        rc.attach_optimizer(opt, collection=coll)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) + coll.loss()
        loss.backward()
        opt.step()
    return model.weight.detach()


@pytest.mark.parametrize(
    "info", [p for p in PENALTIES if p.module and p.shape == (3, 4)], ids=lambda p: p.name
)
def test_the_attached_step_gives_the_weights_of_the_loss_path(info):
    """Penalties with step math are applied in the step (loss() then gives their value without
    a gradient); the others stay in the loss. Either way, the weights of the loss path."""
    # Three SGD steps of 12 weights: the update's sums differ in order only, a few ulps a step.
    torch.testing.assert_close(
        _train(info, attach=True), _train(info, attach=False), rtol=0, atol=3 * 8 * EPS32
    )
