"""Fidelity to the peers, checked against the real packages where they install here (Keras 3
on its torch backend is a test extra); TensorFlow 1's values come from its documented formulas.
"""

from __future__ import annotations

import os

import pytest
import torch

import regcollect as rc

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="pip install .[test] installs keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another backend was chosen first
    pytest.skip("keras runs on another backend in this process", allow_module_level=True)


def keras_dense(units, n_in, regularizer):
    model = keras.Sequential(
        [keras.Input((n_in,)), keras.layers.Dense(units, kernel_regularizer=regularizer)]
    )
    model(torch.randn(2, n_in))
    return model


@pytest.mark.parametrize(("keras_mode", "same_as"), [("rows", "inputs"), ("columns", "outputs")])
def test_orthogonal_on_a_ported_dense_kernel_gives_keras_numbers(keras_mode, same_as):
    model = keras_dense(6, 5, keras.regularizers.OrthogonalRegularizer(0.1, mode=keras_mode))
    kernel = torch.as_tensor(keras.ops.convert_to_numpy(model.layers[0].kernel))  # (in, units)
    want = float(keras.ops.convert_to_numpy(sum(model.losses)))
    for mode in (keras_mode, same_as):  # Keras's name, and the name of what it makes orthogonal
        coll = rc.Collection()
        layer = rc.nn.Linear(5, 6, kernel_regularizer=rc.Orthogonal(0.1, mode), collection=coll)
        with torch.no_grad():
            layer.weight.copy_(kernel.t())  # torch's (units, in) layout
        assert coll.loss().item() == pytest.approx(want, rel=1e-5), mode
        # rc.regularize on a plain torch.nn.Linear maps the same way
        plain = torch.nn.Linear(5, 6)
        with torch.no_grad():
            plain.weight.copy_(kernel.t())
        other = rc.Collection()
        rc.regularize(plain, kernel=rc.Orthogonal(0.1, mode), collection=other)
        assert other.loss().item() == pytest.approx(want, rel=1e-5), mode
    # Called on a tensor, "rows" are that tensor's rows, as in Keras.
    direct = keras.regularizers.OrthogonalRegularizer(0.1, mode=keras_mode)(kernel)
    assert rc.Orthogonal(0.1, keras_mode)(kernel).item() == pytest.approx(
        float(keras.ops.convert_to_numpy(direct)), rel=1e-5
    )


def test_orthogonal_modes_on_recurrent_and_embedding_weights():
    lstm = rc.nn.LSTM(4, 3, kernel_regularizer=rc.Orthogonal(1.0, "rows"))
    # Keras's LSTM kernel is (in, 4 * units): "rows" are torch's columns there.
    assert rc.loss().item() == pytest.approx(rc.Orthogonal(1.0, "inputs")(lstm.weight_ih_l0).item())
    rc.get_collection().clear()
    embedding = rc.nn.Embedding(7, 4, embeddings_regularizer=rc.Orthogonal(1.0, "rows"))
    # Embedding tables are (vocabulary, dim) in both: no transpose.
    assert rc.loss().item() == pytest.approx(rc.Orthogonal(1.0, "rows")(embedding.weight).item())
    assert rc.Orthogonal(1.0, "outputs")(embedding.weight).item() == pytest.approx(rc.loss().item())


KERAS_AND_RC = [
    (lambda: keras.regularizers.L1(0.3), rc.L1(0.3)),
    (lambda: keras.regularizers.L2(0.2), rc.L2(0.2)),
    (lambda: keras.regularizers.L1L2(l1=0.1, l2=0.4), rc.L1L2(0.1, 0.4)),
    (lambda: keras.regularizers.OrthogonalRegularizer(0.5, "rows"), rc.Orthogonal(0.5, "rows")),
    (
        lambda: keras.regularizers.OrthogonalRegularizer(0.5, "columns"),
        rc.Orthogonal(0.5, "columns"),
    ),
]


@pytest.mark.parametrize(("make_keras", "ours"), KERAS_AND_RC)
def test_serialized_configs_load_in_keras_and_back(make_keras, ours):
    x = torch.randn(5, 4)
    theirs = make_keras()
    # regcollect -> Keras
    loaded = keras.regularizers.deserialize(rc.serialize(ours))
    assert type(loaded) is type(theirs) and loaded.get_config() == pytest.approx(
        theirs.get_config()
    )
    # Keras -> regcollect
    back = rc.regularizers.deserialize(keras.regularizers.serialize(theirs))
    # Keras keeps coefficients as float32 (0.3 -> 0.30000001192092896)
    assert type(back) is type(ours) and back.get_config() == pytest.approx(ours.get_config())
    want = float(keras.ops.convert_to_numpy(theirs(x)))
    assert back(x).item() == pytest.approx(want, rel=1e-5)
    assert rc.serialize(ours)["class_name"] == keras.regularizers.serialize(theirs)["class_name"]


def test_modes_keras_cannot_read_are_refused_clearly():
    with pytest.raises(
        ValueError, match='mode must be "rows" or "columns".*"outputs" or "inputs", got \'diag\''
    ):
        rc.Orthogonal(0.1, "diag")
    old = rc.regularizers.deserialize(
        {"class_name": "Orthogonal", "config": {"factor": 0.1, "mode": "rows"}}
    )
    assert isinstance(old, rc.Orthogonal)  # what earlier versions wrote still loads
