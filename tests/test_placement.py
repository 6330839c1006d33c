"""Where a regularized tensor's values are (regcollect._distributed): tensor classes no engine
adapter knows, as a user would meet them."""

from __future__ import annotations

import warnings

import pytest
import torch

import regcollect as rc


class Wrapped(torch.Tensor):
    """A wrapper subclass with a ``__torch_dispatch__`` of its own holding all its values, as
    torch's FakeTensor (under ``torch.export``) or a MaskedTensor does in one process."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapped:
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, requires_grad=inner.requires_grad
        )
        out.inner = inner
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        unwrap = lambda x: x.inner if isinstance(x, Wrapped) else x  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        out = func(*args, **kwargs)
        if func is torch.ops.aten.detach.default:  # what nn.Parameter asks of a subclass
            return Wrapped(out)
        return out


def test_a_wrapper_subclass_in_one_process_gets_the_value_and_gradient_of_its_values():
    """One process holds all of any tensor's values: a subclass regcollect has no adapter for
    is computed on what it says its values are (with several ranks it is refused by name:
    tests/distributed, unknown_sharded_refused)."""
    coll = rc.Collection()
    layer = torch.nn.Linear(4, 3)
    weight = torch.randn(3, 4)
    layer.weight = torch.nn.Parameter(Wrapped(weight.clone()))
    rc.regularize(layer, kernel=rc.l2(0.1), bias=None, collection=coll)
    penalty = coll.loss()
    penalty.backward()
    torch.testing.assert_close(penalty, 0.1 * (weight**2).sum())
    grad = layer.weight.grad
    torch.testing.assert_close(grad.inner if isinstance(grad, Wrapped) else grad, 0.2 * weight)


def test_torch_export_of_a_model_adding_the_penalty_in_forward_equals_eager():
    """Non-strict torch.export runs the model on torch's FakeTensors (a wrapper subclass)."""
    coll = rc.Collection()

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).sum() + coll.loss()

    model = Model()
    coll.register(model.lin, "weight", rc.l2(0.5))
    x = torch.randn(3, 4)
    exported = torch.export.export(model, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), model(x))


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


HOOKS_SCRIPT = r"""
import gc, torch
import torch.optim.optimizer as O
import torch.nn.modules.module as M
import regcollect as rc

def tables():
    return (len(O._global_optimizer_pre_hooks), len(O._global_optimizer_post_hooks),
            len(M._global_module_registration_hooks))

before = tables()
model = torch.nn.Sequential(torch.nn.Linear(3, 2))
handle = rc.regularize(model, kernel=rc.l2(rc.schedules.warmup(0.1, steps=4)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
torch.optim.SGD(rc.param_groups(model), lr=0.1)
(model(torch.randn(4, 3)).sum() + rc.loss()).backward()
opt.step()
during = tables()
handle.remove()
after_remove = tables()
# Again, then the model deleted: the next optimizer step finds nothing regularized.
layer = rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.1))
other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
again = tables()
del layer
gc.collect()
other.step()
after_delete = tables()
print((before, during, after_remove, again, after_delete))
"""


def test_the_optimizer_step_hooks_come_out_when_nothing_is_regularized():
    """torch's process-wide optimizer-step hook tables hold regcollect's hooks only while a
    collection holds an entry: the last handle removed, or the last regularized model deleted,
    takes them out (a fresh process: the suite's own collections would keep them in)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", HOOKS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    before, during, after_remove, again, after_delete = eval(out)
    # The optimizer-step hooks come out; the module-registration hook (names) stays once in.
    assert during == (before[0] + 1, before[1] + 1, before[2] + 1)
    assert after_remove == (before[0], before[1], during[2])
    assert again[1] == before[1] + 1 and after_delete == (before[0], before[1], during[2])


def test_losses_of_penalties_an_attached_optimizer_applies_have_no_gradient_as_in_loss():
    coll = rc.Collection()
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rc.regularize(model, kernel=rc.l2(0.1), bias=None, collection=coll)
    rc.add_regularizer(
        model, "0.bias", rc.regularizers.Custom(lambda b: (b**4).sum()), collection=coll
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = rc.attach_optimizer(opt, collection=coll)
    kernel, bias = coll.losses()
    # The step applies the kernel's L2: its value, no gradient; the custom penalty stays.
    assert not kernel.requires_grad and bias.requires_grad
    assert kernel.item() == pytest.approx(0.1 * (model[0].weight.detach() ** 2).sum().item())
    handle.remove()
    assert all(v.requires_grad for v in coll.losses())
