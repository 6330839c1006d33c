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


# --- decay sets: Hugging Face Trainer and timm -------------------------------------------------


def regularized(model, **kwargs):
    coll = rc.Collection()
    handle = rc.regularize(model, collection=coll, **kwargs)
    return {id(e.resolve()) for e in handle.entries}


def test_hf_trainer_decay_set_is_kernel_plus_embeddings():
    transformers = pytest.importorskip("transformers", reason="pip install .[test]")
    small = {"vocab_size": 50, "num_hidden_layers": 1, "num_attention_heads": 2}
    models = [
        transformers.BertForSequenceClassification(
            transformers.BertConfig(
                hidden_size=8, intermediate_size=16, max_position_embeddings=16, **small
            )
        ),
        transformers.GPT2LMHeadModel(  # lm_head tied to wte
            transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=50)
        ),
    ]
    for model in models:
        names = transformers.Trainer.get_decay_parameter_names(None, model)
        params = dict(model.named_parameters())
        want = {id(params[n]) for n in names if n in params}
        reg = rc.l2(1e-4)
        # The documented one-liner: kernels and embedding tables.
        assert regularized(model, kernel=reg, embeddings=reg) == want, type(model).__name__
        # Kernels alone leave the tables out, which HF decays.
        tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        assert regularized(model, kernel=reg) == want - tables


def timm_decay_set(model):
    """timm's ``param_groups_weight_decay``: no decay for ``ndim <= 1``, ``.bias`` and the
    ``no_weight_decay()`` names, which are glob patterns (fnmatch)."""
    import fnmatch

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return {
        id(p)
        for name, p in model.named_parameters()
        if not (
            p.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pattern) for pattern in skip)
        )
    }


class LayerNorm2d(torch.nn.LayerNorm):  # timm's: a LayerNorm over channels of NCHW
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTLike(torch.nn.Module):
    def __init__(self, dim=8, patterns=("pos_embed", "cls_token")):
        super().__init__()
        self.patterns = set(patterns)
        self.patch_embed = torch.nn.Conv2d(3, dim, 4, 4)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = torch.nn.Sequential(
            torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(3 * dim, dim)
        )
        self.head = torch.nn.Linear(dim, 10)

    def no_weight_decay(self):
        return self.patterns


class XCiTLike(ViTLike):  # xcit: a positional-encoding module, skipped by a pattern
    def __init__(self, dim=8):
        super().__init__(dim, patterns=("pos_embed.*", "cls_token"))
        del self.pos_embed
        self.pos_embed = torch.nn.Module()
        self.pos_embed.token_projection = torch.nn.Conv2d(2 * dim, dim, 1)


class ConvNeXtLike(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim))
        self.dwconv = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.pwconv1 = torch.nn.Linear(dim, 4 * dim)
        self.pwconv2 = torch.nn.Linear(4 * dim, dim)
        self.gamma = torch.nn.Parameter(torch.full((dim,), 1e-6))  # layer scale, 1-D
        self.head = torch.nn.Linear(dim, 10)


@pytest.mark.parametrize("build", [ViTLike, XCiTLike, ConvNeXtLike])
def test_timm_decay_set_is_kernel(build):
    model = build()
    assert regularized(model, kernel=rc.l2(1e-4)) == timm_decay_set(model)


def test_no_weight_decay_glob_patterns_are_matched_like_timm():
    model = XCiTLike()
    names = {
        e.name for e in rc.regularize(model, kernel=rc.l2(1e-4), collection=rc.Collection()).entries
    }
    assert "pos_embed.token_projection.weight" not in names  # 'pos_embed.*' was matched literally
    assert "cls_token" not in names and "patch_embed.weight" in names


def test_the_transformers_decay_set_is_exact_on_every_architecture(tiny_hf_models):
    """``integrations.transformers.regularize`` registers exactly what
    ``Trainer.get_decay_parameter_names`` decays; ``kernel=``/``embeddings=`` (timm's rule)
    differs on T5, CLIP, Wav2Vec2 and ConvNeXt, as the docs say."""
    transformers = pytest.importorskip("transformers", reason="pip install .[test]")
    from regcollect.integrations.transformers import regularize

    differs = set()
    for name, (model, _) in tiny_hf_models(transformers).items():
        names = transformers.Trainer.get_decay_parameter_names(None, model)
        want = {id(model.get_parameter(n)) for n in names}  # tied ones under each name
        coll = rc.Collection()
        handle = regularize(model, rc.l2(1e-4), collection=coll)
        assert {id(e.resolve()) for e in handle.entries} == want, name
        reg = rc.l2(1e-4)
        if regularized(model, kernel=reg, embeddings=reg) != want:
            differs.add(name)
    assert differs == {"t5", "clip", "wav2vec2", "convnext"}


# --- porting checklist (docs/migration/keras.md) -----------------------------------------------


def keras_activity_divisor(batch):
    """What the installed Keras divides an activity penalty by: the batch size from Keras 3.13
    on (keras-team/keras#22021), nothing before (Keras 3.12 is the newest for Python 3.10)."""
    layer = keras.layers.Dense(
        1,
        use_bias=False,
        kernel_initializer="ones",
        activity_regularizer=keras.regularizers.L1(1.0),
    )
    layer(torch.ones(batch, 1))  # the penalty is batch before any division
    return batch / float(sum(layer.losses))


def test_a_dense_activity_penalty_is_on_the_output_after_its_activation():
    """Keras's ``Dense(6, activation="relu", activity_regularizer=R)`` penalises the output
    after the activation. Ported with the regularizer on ``nn.ReLU`` it gives Keras's number;
    the literal port on the ``Linear`` penalises the pre-activation and does not."""
    torch.manual_seed(0)
    reg = 0.1
    keras_model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                6, activation="relu", activity_regularizer=keras.regularizers.L2(reg)
            ),
        ]
    )
    x = torch.randn(8, 4)
    keras_model(x)
    kernel, bias = (torch.as_tensor(v.numpy()) for v in keras_model.layers[0].weights)
    # Per example, as regcollect divides (and Keras from 3.13 on).
    want = float(sum(keras_model.losses)) * keras_activity_divisor(8) / 8

    def ported(on_activation):
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
        with torch.no_grad():
            model[0].weight.copy_(kernel.t())
            model[0].bias.copy_(bias)
        coll = rc.Collection()
        target = model[1] if on_activation else model[0]
        rc.add_activity_regularizer(target, rc.l2(reg), collection=coll)
        model(x)
        return coll.loss().item()

    assert ported(on_activation=True) == pytest.approx(want, rel=1e-6)
    assert ported(on_activation=False) != pytest.approx(want, rel=1e-2)


class LastStep(torch.nn.Module):
    """``nn.LSTM``'s output sequence to its last step: Keras's ``return_sequences=False``."""

    def forward(self, output):
        sequence, _ = output
        return sequence[:, -1]


def _keras_lstm_to_torch(layer, units, n_in):
    """A Keras LSTM's weights in an ``nn.LSTM`` (gates i, f, c/g, o in both). Keras has one
    bias; torch two, so one of them is zero."""
    kernel, recurrent, bias = (torch.as_tensor(v.numpy()) for v in layer.weights)
    lstm = torch.nn.LSTM(n_in, units, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(kernel.t())
        lstm.weight_hh_l0.copy_(recurrent.t())
        lstm.bias_ih_l0.copy_(bias)
        lstm.bias_hh_l0.zero_()
    return lstm


def test_an_lstm_that_returns_its_last_step_penalises_that_step_only():
    """Keras's ``LSTM(return_sequences=False, activity_regularizer=R)`` penalises the last
    step's output; ``rc.nn.LSTM``'s activity regularizer sees the whole sequence. The port is
    the regularizer on a module that takes the last step. Keras's bias regularizer on its one
    bias is ``bias_ih`` alone here (the other bias stays zero, or is left unregularized)."""
    torch.manual_seed(0)
    units, n_in = 5, 3
    layer = keras.layers.LSTM(
        units,
        activity_regularizer=keras.regularizers.L2(0.2),
        bias_regularizer=keras.regularizers.L1(0.05),
    )
    keras.Sequential([keras.Input((7, n_in)), layer])
    x = torch.randn(4, 7, n_in)
    want_output = torch.as_tensor(keras.ops.convert_to_numpy(layer(x)))
    bias_part = 0.05 * float(abs(layer.weights[2].numpy()).sum())
    # The activity part per example, as regcollect divides (and Keras from 3.13 on).
    keras_activity = (float(sum(layer.losses)) - bias_part) * keras_activity_divisor(4) / 4
    want = keras_activity + bias_part

    lstm = _keras_lstm_to_torch(layer, units, n_in)
    model = torch.nn.Sequential(lstm, LastStep())
    coll = rc.Collection()
    rc.add_activity_regularizer(model[1], rc.l2(0.2), collection=coll)
    rc.add_regularizer(lstm, "bias_ih_l0", rc.l1(0.05), collection=coll)
    out = model(x)
    assert torch.allclose(out, want_output, atol=1e-5)
    assert coll.loss().item() == pytest.approx(want, rel=1e-5)

    # The literal port (the regularizer on the LSTM) takes the whole sequence: every step's
    # penalty, several times Keras's.
    coll = rc.Collection()
    rc.add_activity_regularizer(lstm, rc.l2(0.2), collection=coll)
    sequence, _ = lstm(x)
    literal = coll.loss().item()
    assert literal == pytest.approx(0.2 * float((sequence**2).sum()) / 4, rel=1e-5)
    assert literal > 2 * keras_activity
    # rc.nn.LSTM's bias_regularizer regularizes both biases (the checklist's third point).
    coll = rc.Collection()
    ported = rc.nn.LSTM(n_in, units, bias_regularizer=rc.l1(0.05), collection=coll)
    assert sorted(e.param for e in coll.entries(ported)) == ["bias_hh_l0", "bias_ih_l0"]
