import copy
import inspect
import io
import pickle
import subprocess
import sys
import textwrap

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
    with pytest.warns(rc.RegcollectWarning, match="regularizes nothing"):  # no bias to penalise
        layer = rc.nn.Linear(
            2,
            2,
            bias=False,
            kernel_regularizer="l1_l2",
            bias_regularizer={"class_name": "L1", "config": {"l1": 0.1}},
        )
    assert layer.kernel_regularizer == rc.L1L2(0.01, 0.01)
    assert [e.param for e in rc.get_collection().entries()] == ["weight"]
    with pytest.warns(rc.RegcollectWarning, match="regularizes nothing"):
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
    last = rc.loss().item()
    assert rc.loss().item() == last  # reading twice changes nothing
    weights = sum(v for k, v in rc.penalties().items() if k not in ("3:activity", "total"))
    assert weights < before  # the weight penalties shrank


# --- one source of truth: the layer's attributes read through to its collection -----------------


def test_attributes_follow_add_regularizer_and_handles_restore():
    layer = rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(0.5))
    with rc.add_regularizer(layer, "weight", rc.l1(0.1)):
        assert layer.kernel_regularizer == rc.l1(0.1)
        assert rc.loss().item() == pytest.approx(0.1 * layer.weight.abs().sum().item(), rel=1e-6)
    assert layer.kernel_regularizer == rc.l2(0.5)  # restored, not deleted
    assert rc.loss().item() == pytest.approx(0.5 * (layer.weight**2).sum().item(), rel=1e-6)
    model = torch.nn.Sequential(layer)
    with rc.regularize(model, kernel=rc.l1(2.0), bias=rc.l1(3.0)):
        assert layer.kernel_regularizer == rc.l1(2.0) and layer.bias_regularizer == rc.l1(3.0)
    assert layer.kernel_regularizer == rc.l2(0.5) and layer.bias_regularizer is None
    assert [e.name for e in rc.get_collection().entries()] == ["0.weight"]


def test_assigning_an_attribute_registers_it():
    layer = rc.nn.Linear(3, 3)
    assert rc.get_collection().entries() == []
    layer.kernel_regularizer = "l1"
    layer.activity_regularizer = rc.l2(1.0)
    assert layer.kernel_regularizer == rc.l1() and len(rc.get_collection()) == 2
    out = layer(torch.randn(2, 3))
    want = 0.01 * layer.weight.abs().sum() + (out**2).sum() / 2
    assert rc.loss().item() == pytest.approx(want.item(), rel=1e-6)
    layer.kernel_regularizer = None
    layer.activity_regularizer = None
    assert rc.get_collection().entries() == [] and len(layer._forward_hooks) == 0
    with pytest.raises(ValueError, match="unknown regularizer 'l7'"):
        layer.kernel_regularizer = "l7"


def test_entry_is_read_only():
    layer = rc.nn.Linear(2, 2, kernel_regularizer="l2")
    entry = rc.get_collection().entries()[0]
    for attribute in ("regularizer", "kind", "param", "prefix", "name"):
        with pytest.raises(AttributeError):
            setattr(entry, attribute, None)
    assert layer.kernel_regularizer is entry.regularizer


def test_copy_after_remove_registers_nothing():
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), activity_regularizer="l1")
    assert rc.get_collection().remove(layer) == 2
    assert layer.kernel_regularizer is None and layer.activity_regularizer is None
    clone = copy.deepcopy(layer)
    assert len(rc.get_collection()) == 0 and clone.kernel_regularizer is None


def test_copy_keeps_what_was_registered_on_the_layer_since():
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))
    rc.add_regularizer(layer, "bias", rc.l1(0.3))
    clone = copy.deepcopy(layer)
    assert clone.kernel_regularizer == rc.l2(1.0) and clone.bias_regularizer == rc.l1(0.3)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_copies_stay_in_their_custom_collection(how):
    coll = rc.Collection()
    model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=coll))
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert clone[0]._rc_collection is coll and len(coll) == 2 and len(rc.get_collection()) == 0
    want = (clone[0].weight ** 2).sum()
    assert coll.loss(clone).item() == pytest.approx(want.item(), rel=1e-6)


def test_copy_of_a_lost_custom_collection_warns_once_in_a_fresh_process(tmp_path):
    coll = rc.Collection()
    model = torch.nn.Sequential(
        rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=coll),
        rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=coll),
    )
    path = tmp_path / "model.pt"
    torch.save(model, path)
    script = textwrap.dedent(f"""
        import warnings, torch, regcollect as rc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = torch.load({str(path)!r}, weights_only=False)
        lost = [w for w in caught if issubclass(w.category, rc.RegcollectWarning)]
        assert len(lost) == 1 and "default collection" in str(lost[0].message), lost
        assert len(rc.get_collection()) == 2
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --- copies ---------------------------------------------------------------------------------------


def build():
    return torch.nn.Sequential(
        rc.nn.Linear(4, 3, kernel_regularizer=rc.l2(0.5), bias_regularizer=rc.l1(0.25)),
        torch.nn.ReLU(),
        rc.nn.Linear(3, 2, activity_regularizer=rc.l1(1.0)),
    )


def weights_penalty(model):
    return 0.5 * (model[0].weight ** 2).sum() + 0.25 * model[0].bias.abs().sum()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_keep_their_regularizers(how):
    model = build()
    clone = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    assert clone[0].kernel_regularizer == rc.l2(0.5)
    assert clone[2].activity_regularizer == rc.l1(1.0)
    both = weights_penalty(model) + weights_penalty(clone)
    with pytest.warns(rc.RegcollectWarning, match="separate models"):
        assert rc.loss().item() == pytest.approx(both.item(), rel=1e-5)
    x = torch.randn(2, 4)
    out = clone(x)
    assert rc.loss().item() == pytest.approx((both + out.abs().sum() / 2).item(), rel=1e-5)
    # The pass is not backpropagated: its activity penalty is still the clone's.
    assert rc.loss(clone).item() == pytest.approx(
        (weights_penalty(clone) + out.abs().sum() / 2).item(), rel=1e-5
    )
    assert set(rc.penalties(clone)) == {"0.weight", "0.bias", "2:activity", "total"}
    assert len(rc.get_collection()) == 6
    del model
    import gc

    gc.collect()
    assert len(rc.get_collection()) == 3


def test_ema_teacher_is_frozen_or_removed():
    student = build()
    teacher = copy.deepcopy(student).requires_grad_(False)  # the usual EMA set-up
    assert rc.loss().item() == pytest.approx(weights_penalty(student).item(), rel=1e-5)
    teacher.requires_grad_(True)
    assert rc.get_collection().remove(teacher) == 3
    assert rc.loss().item() == pytest.approx(weights_penalty(student).item(), rel=1e-5)


def test_deepcopy_stays_in_custom_collection():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=coll)
    clone = copy.deepcopy(layer)
    assert len(coll) == 2 and len(rc.get_collection()) == 0
    assert clone._rc_collection is coll


def test_torch_save_load_in_a_fresh_process(tmp_path):
    model = build()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    expected = weights_penalty(model).item()
    script = textwrap.dedent(f"""
        import torch, regcollect as rc
        model = torch.load({str(path)!r}, weights_only=False)
        assert model[0].kernel_regularizer == rc.l2(0.5), model[0].kernel_regularizer
        out = model(torch.ones(3, 4))
        value = rc.loss().item()
        expected = {expected!r} + out.abs().sum().item() / 3
        assert abs(value - expected) < 1e-5 * max(1.0, expected), (value, expected)
        print(sorted(rc.penalties()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout


def test_a_users_subclass_keeps_its_own_docstring():
    """The generated docstrings (Args from the targets, an example) are for rc.nn's own
    layers: a subclass a user writes does not get one naming rc.nn.<its name>."""

    class MyLinear(rc.nn.Linear):
        pass

    class Documented(rc.nn.Linear):
        """My layer."""

    assert MyLinear.__doc__ is None
    assert Documented.__doc__ == "My layer."
    assert "rc.nn.Linear(4, 2, kernel_regularizer=rc.l2(1e-4))" in rc.nn.Linear.__doc__
