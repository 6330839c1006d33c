import pytest
import torch

import regcollect as rc
from regcollect.compat import v1

W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])


def test_tf1_scaling():
    assert v1.l2_regularizer(0.1)(W).item() == pytest.approx(0.1 * 14 / 2)
    assert v1.l1_regularizer(0.1)(W).item() == pytest.approx(0.1 * 6)
    assert v1.l1_l2_regularizer()(W).item() == pytest.approx(6 + 14 / 2)
    assert v1.l1_l2_regularizer(0.5, 0.2)(W).item() == pytest.approx(0.5 * 6 + 0.2 * 14 / 2)
    # TF1's l2_regularizer(s) is Keras's l2(s / 2) and SGD(weight_decay=s)
    assert v1.l2_regularizer(0.3) == rc.l2(0.15)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "0.1", True, 1, 0])
def test_scales_validated(bad):
    with pytest.raises(ValueError, match="scale"):
        v1.l2_regularizer(bad)
    with pytest.raises(ValueError, match="scale_l1"):
        v1.l1_l2_regularizer(scale_l1=bad)


def test_sum_regularizer():
    reg = v1.sum_regularizer([v1.l1_regularizer(0.1), None, v1.l2_regularizer(0.2)])
    assert reg(W).item() == pytest.approx(0.1 * 6 + 0.2 * 14 / 2)
    # Computed as the L1L2 it equals: the same value and gradient.
    layer = torch.nn.Linear(3, 2, bias=False)
    totals = []
    for r in (reg, rc.l1_l2(0.1, 0.1)):
        coll = rc.Collection()
        with rc.regularize(layer, kernel=r, collection=coll):
            totals.append(coll.loss())
    assert totals[0].item() == totals[1].item()
    grads = [torch.autograd.grad(t, layer.weight)[0] for t in totals]
    assert torch.equal(grads[0], grads[1])
    assert rc.deserialize(rc.serialize(reg))(W).item() == pytest.approx(reg(W).item())
    assert v1.sum_regularizer([]) is None


def test_apply_regularization_and_collection_keys():
    layer = torch.nn.Linear(2, 2)
    total = v1.apply_regularization(v1.l2_regularizer(1.0), [layer.weight, layer.bias])
    expected = ((layer.weight**2).sum() + (layer.bias**2).sum()) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert v1.get_regularization_loss().item() == pytest.approx(expected.item(), rel=1e-6)
    v1.apply_regularization(v1.l2_regularizer(1.0), [layer.weight])  # re-run: replaces
    assert len(v1.get_regularization_losses()) == 2
    losses = v1.get_collection(v1.GraphKeys.REGULARIZATION_LOSSES)
    assert sum(t.item() for t in losses) == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="regularization_losses"):
        v1.get_collection("update_ops")
    with pytest.raises(ValueError, match="weights_list"):
        v1.apply_regularization(v1.l2_regularizer(1.0))
    with pytest.raises(TypeError, match=r"weights_list\[0\]"):
        v1.apply_regularization(v1.l2_regularizer(1.0), [1.0])


def test_tf1_style_scope_filtering():
    with rc.scope("tower_0"):
        tower = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=v1.l2_regularizer(1.0)))
    _keep = rc.nn.Linear(2, 2, kernel_regularizer=v1.l2_regularizer(1.0))
    losses = v1.get_regularization_losses(scope="tower_0")
    assert len(losses) == 1
    assert losses[0].item() == pytest.approx(((tower[0].weight ** 2).sum() / 2).item(), rel=1e-6)
    assert len(v1.get_regularization_losses()) == 2


def test_variable_scope_regularizes_every_weight_like_tf_layers():
    # TF1: with variable_scope(name, regularizer=r), tf.layers.dense regularizes its kernel
    # and its bias (get_variable falls back to the scope's regularizer for both).
    reg = v1.l2_regularizer(0.1)  # 0.1 * sum(w**2) / 2
    with v1.variable_scope("tower", regularizer=reg, reuse=v1.AUTO_REUSE):
        dense = rc.nn.Linear(3, 2)
        norm = rc.nn.BatchNorm1d(2)
        table = rc.nn.Embedding(5, 2)
        lstm = rc.nn.LSTM(2, 2)
        own = rc.nn.Linear(2, 2, kernel_regularizer=v1.l1_regularizer(1.0))  # its own wins
    model = torch.nn.ModuleList([dense, norm, table, lstm, own])  # one model, not five
    weights = [dense.weight, dense.bias, norm.weight, norm.bias, table.weight]
    weights += [p for p in lstm.parameters()] + [own.bias]
    want = sum(0.05 * (w.detach().double() ** 2).sum() for w in weights)
    want += own.weight.detach().double().abs().sum()
    assert v1.get_regularization_loss("tower").item() == pytest.approx(want.item(), rel=1e-6)
    names = [e.name for e in rc.get_collection().entries()]
    assert all(n.startswith("tower/") for n in names) and "tower/1.bias" in names
    assert len(v1.get_regularization_losses(scope="tower")) == len(weights) + 1
    assert v1.get_regularization_loss(name="total_regularization_loss").item() == pytest.approx(
        want.item(), rel=1e-6
    )
    assert len(model) == 5
    with pytest.raises(TypeError, match="initializer has no PyTorch equivalent"):
        with v1.variable_scope("x", initializer=object()):
            pass
    with pytest.raises(ValueError, match="name_or_scope or default_name"):
        with v1.variable_scope(None):
            pass
    with v1.variable_scope(None, default_name="dense"):  # TF1's default_name
        assert rc.nn.Linear(1, 1).kernel_regularizer is None  # no regularizer given


def test_apply_regularization_counts_tensors_that_do_not_train():
    # TF1's collection holds the penalty of every weight it was given, trainable or not.
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # requires_grad=False
    total = v1.apply_regularization(v1.l2_regularizer(1.0), [w])
    assert total.item() == pytest.approx(7.0)
    assert v1.get_regularization_loss().item() == pytest.approx(7.0)  # was 0.0
    assert [t.item() for t in v1.get_regularization_losses()] == pytest.approx([7.0])


def test_the_differences_from_tf1_the_docs_state():
    """docs/migration/tf1.md: an integer scale is refused, as in TF1; a zero scale still makes
    entries (of value 0; TF1 makes none); apply_regularization makes one entry per weight
    (TF1: one summed entry), whose sum is TF1's value."""
    with pytest.raises(ValueError, match="scale cannot be an integer: 1"):
        v1.l2_regularizer(1)
    with pytest.raises(ValueError, match="scale_l2 cannot be an integer"):
        v1.l1_l2_regularizer(0.5, 2)
    layer = torch.nn.Linear(2, 2)
    coll = rc.Collection()
    with rc.scope("zero", collection=coll):
        v1.apply_regularization(v1.l2_regularizer(0.0), [layer.weight])
    assert [t.item() for t in coll.losses()] == [0.0]
    coll = rc.Collection()
    with rc.scope("tf1", collection=coll):
        total = v1.apply_regularization(v1.l1_regularizer(0.5), [layer.weight, layer.bias])
    entries = coll.losses()
    assert len(entries) == 2
    want = 0.5 * (layer.weight.abs().sum() + layer.bias.abs().sum())
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert sum(e.item() for e in entries) == pytest.approx(want.item(), rel=1e-6)
