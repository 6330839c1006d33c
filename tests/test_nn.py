import inspect

import pytest
import torch

import regcollect as rc

R = rc.l2(0.5)
LAYERS = [
    # (class, constructor args, regularizer kwargs, expected regularized parameter names)
    ("Linear", (4, 3), {"kernel_regularizer": R, "bias_regularizer": R}, {"weight", "bias"}),
    ("Bilinear", (2, 3, 4), {"kernel_regularizer": R}, {"weight"}),
    ("Conv1d", (2, 3, 3), {"kernel_regularizer": R, "bias_regularizer": R}, {"weight", "bias"}),
    ("Conv2d", (2, 3, 3), {"kernel_regularizer": R}, {"weight"}),
    ("Conv3d", (2, 3, 3), {"bias_regularizer": R}, {"bias"}),
    ("ConvTranspose1d", (2, 3, 3), {"kernel_regularizer": R}, {"weight"}),
    (
        "ConvTranspose2d",
        (2, 3, 3),
        {"kernel_regularizer": R, "bias_regularizer": R},
        {"weight", "bias"},
    ),
    ("ConvTranspose3d", (2, 3, 3), {"kernel_regularizer": R}, {"weight"}),
    ("Embedding", (10, 4), {"embeddings_regularizer": R}, {"weight"}),
    ("EmbeddingBag", (10, 4), {"embeddings_regularizer": R}, {"weight"}),
    ("RNN", (3, 4, 2), {"kernel_regularizer": R}, {"weight_ih_l0", "weight_ih_l1"}),
    ("LSTM", (3, 4), {"recurrent_regularizer": R}, {"weight_hh_l0"}),
    ("GRU", (3, 4), {"bias_regularizer": R}, {"bias_ih_l0", "bias_hh_l0"}),
    ("BatchNorm1d", (4,), {"gamma_regularizer": R, "beta_regularizer": R}, {"weight", "bias"}),
    ("BatchNorm2d", (4,), {"gamma_regularizer": R}, {"weight"}),
    ("BatchNorm3d", (4,), {"beta_regularizer": R}, {"bias"}),
    ("LayerNorm", (4,), {"gamma_regularizer": R, "beta_regularizer": R}, {"weight", "bias"}),
    ("GroupNorm", (2, 4), {"gamma_regularizer": R}, {"weight"}),
]


@pytest.mark.parametrize(("name", "args", "regs", "expected"), LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_is_a_drop_in(name, args, regs, expected):
    cls, base = getattr(rc.nn, name), getattr(torch.nn, name)
    layer = cls(*args, **regs)
    assert isinstance(layer, base)
    for argument, reg in regs.items():
        assert getattr(layer, argument) is reg
    plain = base(*args)
    assert list(plain.state_dict()) == list(layer.state_dict())
    plain.load_state_dict(layer.state_dict())  # ours -> plain
    fresh = cls(*args, collection=rc.Collection())
    fresh.load_state_dict(plain.state_dict())  # plain -> ours
    for key, value in layer.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key])
    entries = rc.get_collection().entries()
    assert {e.param for e in entries} == expected
    assert all(e.module is layer for e in entries)
    params = dict(layer.named_parameters())
    reference = sum(0.5 * (params[p] ** 2).sum() for p in expected)
    assert rc.loss().item() == pytest.approx(reference.item(), rel=1e-5)


def test_bidirectional_rnn_and_projections():
    lstm = rc.nn.LSTM(
        3,
        4,
        num_layers=2,
        bidirectional=True,
        proj_size=2,
        kernel_regularizer="l2",
        recurrent_regularizer="l1",
        bias_regularizer="l1",
    )
    by_reg = {}
    for e in rc.get_collection().entries():
        by_reg.setdefault(type(e.regularizer).__name__, set()).add(e.param)
    assert by_reg["L2"] == {
        f"weight_{k}_l{n}{s}" for k in ("ih", "hr") for n in (0, 1) for s in ("", "_reverse")
    }
    assert by_reg["L1"] == {
        f"{k}_l{n}{s}"
        for k in ("weight_hh", "bias_ih", "bias_hh")
        for n in (0, 1)
        for s in ("", "_reverse")
    }
    assert lstm(torch.randn(5, 2, 3))[0].shape == (5, 2, 4)


def test_string_and_dict_identifiers_and_no_bias():
    layer = rc.nn.Linear(
        2,
        2,
        bias=False,
        kernel_regularizer="l1_l2",
        bias_regularizer={"class_name": "L1", "config": {"l1": 0.1}},
    )
    assert layer.kernel_regularizer == rc.L1L2(0.01, 0.01)
    assert [e.param for e in rc.get_collection().entries()] == ["weight"]  # no bias to penalise
    norm = rc.nn.LayerNorm(3, elementwise_affine=False, gamma_regularizer="l2")
    assert norm.gamma_regularizer is None  # no weight: nothing counts, the attribute says so
    assert len(rc.get_collection()) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown regularizer 'l3'"):
        rc.nn.Linear(2, 2, kernel_regularizer="l3")
    with pytest.raises(TypeError):
        rc.nn.Linear(2, 2, recurrent_regularizer="l2")  # not an argument of Linear
    with pytest.raises(TypeError, match="collection must be a regcollect.Collection"):
        rc.nn.Linear(2, 2, collection=object())


def test_signature_and_repr():
    sig = inspect.signature(rc.nn.Conv2d)
    assert list(sig.parameters)[:3] == ["in_channels", "out_channels", "kernel_size"]
    for argument in (
        "kernel_regularizer",
        "bias_regularizer",
        "activity_regularizer",
        "collection",
    ):
        assert sig.parameters[argument].kind is inspect.Parameter.KEYWORD_ONLY
    assert "embeddings_regularizer" in inspect.signature(rc.nn.Embedding).parameters
    layer = rc.nn.Linear(2, 3, kernel_regularizer=rc.l2(0.1))
    assert repr(layer) == (
        "Linear(in_features=2, out_features=3, bias=True, kernel_regularizer=L2(l2=0.1))"
    )


def test_layers_work_in_training():
    model = torch.nn.Sequential(
        rc.nn.Conv2d(1, 2, 3, kernel_regularizer="l2"),
        rc.nn.BatchNorm2d(2, gamma_regularizer="l1"),
        torch.nn.Flatten(),
        rc.nn.Linear(2 * 4 * 4, 3, activity_regularizer="l2"),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 1, 6, 6)
    before = rc.loss().item()
    for _ in range(20):
        opt.zero_grad()
        rc.loss().backward()
        opt.step()
        model(x)
    rc.loss()
    assert rc.loss().item() < before  # only weight penalties left: they shrank
