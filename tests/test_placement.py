"""Where a regularized tensor's values are (regcollect._distributed): tensor classes no engine
adapter knows, as a user would meet them."""

from __future__ import annotations

import warnings

import pytest
import torch

import regcollect as rc


class HalfHere(torch.Tensor):
    """A toy sharded tensor: a wrapper subclass whose local storage is half of its rows, as
    a sharding library nobody taught regcollect about would make (DTensor-like)."""

    @staticmethod
    def __new__(cls, local: torch.Tensor, rows: int) -> HalfHere:
        shape = (rows, *local.shape[1:])
        out = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=local.dtype, requires_grad=local.requires_grad
        )
        out.local = local
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.detach.default:  # what nn.Parameter asks of a subclass
            return HalfHere(args[0].local.detach(), args[0].shape[0])
        unwrap = lambda x: x.local if isinstance(x, HalfHere) else x  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        return func(*args, **kwargs)


def test_an_unknown_sharded_tensor_is_refused_by_name_not_computed_per_rank():
    coll = rc.Collection()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    local = torch.randn(2, 4)  # this "rank" holds 2 of the 3 rows
    model[0].weight = torch.nn.Parameter(HalfHere(local, 3))
    rc.regularize(model, kernel=rc.l2(0.1), bias=None, collection=coll)
    with pytest.raises(ValueError) as err:
        coll.loss()
    message = str(err.value)
    assert "'0.weight'" in message and "HalfHere" in message
    assert "__torch_dispatch__" in message and "no regcollect engine adapter knows" in message
    # Frozen, it is left out as any frozen weight, with nothing to refuse.
    model[0].weight.requires_grad_(False)
    assert coll.loss().item() == 0.0


def test_an_unknown_sharded_bare_tensor_is_refused_too():
    coll = rc.Collection()
    x = HalfHere(torch.ones(2, 2, requires_grad=True), 4)
    coll.register_tensor(x, rc.l1(1.0), name="half")
    with pytest.raises(ValueError, match="'half'.*HalfHere"):
        coll.loss()


class Logged(torch.Tensor):
    """A subclass with a ``__torch_function__`` of its own: its values are all here."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class Tagged(torch.nn.Parameter):
    """A subclass of Parameter that only tags it (as quantization-aware or LoRA code does)."""


@pytest.mark.parametrize(
    "make",
    [lambda w: torch.nn.Parameter(w.as_subclass(Logged)), Tagged],
    ids=["function", "tag"],
)
def test_subclasses_holding_all_their_values_get_the_plain_value_and_gradient(make):
    coll = rc.Collection()
    layer = torch.nn.Linear(3, 2)
    weight = torch.randn(2, 3)
    layer.weight = make(weight.clone())
    rc.regularize(layer, kernel=rc.l1_l2(0.3, 0.2), bias=None, collection=coll)
    penalty = coll.loss()
    penalty.backward()
    want = 0.3 * weight.abs().sum() + 0.2 * (weight**2).sum()
    torch.testing.assert_close(penalty.detach().as_subclass(torch.Tensor), want)
    grad = 0.3 * weight.sign() + 0.4 * weight
    torch.testing.assert_close(layer.weight.grad.as_subclass(torch.Tensor), grad)


def test_losses_equal_loss_entry_by_entry_and_keep_their_gradients():
    coll = rc.Collection()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    rc.regularize(model, kernel=rc.l2(0.1), bias=rc.l1(0.05), collection=coll)
    values = coll.losses()
    assert len(values) == 4
    total = coll.loss()
    torch.testing.assert_close(torch.stack(values).sum(), total, rtol=2e-7, atol=0)
    torch.autograd.backward(values[0])
    torch.testing.assert_close(model[0].weight.grad, 0.2 * model[0].weight.detach())
    # Twice: the same values (the per-entry plans are kept, not rebuilt).
    again = coll.losses()
    assert all(torch.equal(a, b) for a, b in zip(values, again))


def test_the_several_models_warning_points_at_the_users_line():
    coll = rc.Collection()
    first = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.1), collection=coll)
    second = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.1), collection=coll)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coll.loss()
    (found,) = [w for w in caught if "separate models" in str(w.message)]
    assert found.filename == __file__
    del first, second
