"""What a newcomer meets (issue 38): warnings for silent no-ops at the user's own line, errors
that say what was meant, Keras regularizers taken as the rc ones they are."""

import warnings

import pytest
import torch

import regcollect as rc


def caught(action):
    """The RegcollectWarnings ``action()`` raises, recorded (not turned into errors)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
    return [w for w in seen if issubclass(w.category, rc.RegcollectWarning)]


# -- registrations that match nothing --


def test_regularize_whose_include_matches_nothing_warns_at_the_users_line():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    (w,) = caught(lambda: rc.regularize(model, kernel=rc.l2(1e-4), include=["encoder.*"]))
    assert w.filename == __file__
    message = str(w.message)
    assert "registered nothing" in message and "include=['encoder.*']" in message
    assert "'0.weight'" in message  # what the names look like
    assert rc.loss().item() == 0.0


def test_regularize_on_a_model_without_weights_warns():
    (w,) = caught(lambda: rc.regularize(torch.nn.ReLU(), kernel=rc.l2(1e-4)))
    assert w.filename == __file__ and "ReLU has no parameters" in str(w.message)


def test_regularize_with_no_regularizer_given_warns():
    (w,) = caught(lambda: rc.regularize(torch.nn.Linear(2, 2)))
    assert "no regularizer was given" in str(w.message)


def test_regularize_that_registers_something_is_silent():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert caught(lambda: rc.regularize(model, kernel=rc.l2(1e-4), include=["1.*"])) == []
    assert [e.name for e in rc.get_collection().entries()] == ["1.weight"]


# -- the same parameters decayed twice --


def step(model, opt, with_loss=True):
    loss = model(torch.ones(2, 3)).sum() + (rc.loss() if with_loss else 0)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_weight_decay_on_parameters_penalised_through_loss_warns_once_at_the_step():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rc.regularize(model, kernel=rc.l2(1e-4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)  # weight_decay=0.01 by default
    (w,) = caught(lambda: step(model, opt))
    assert w.filename == __file__
    message = str(w.message)
    assert "1 parameter" in message and "'0.weight'" in message
    assert "weight_decay=0.01 on AdamW" in message and "rc.loss()" in message
    assert caught(lambda: step(model, opt)) == []  # once per optimizer


def test_no_double_decay_warning_without_decay_or_on_other_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rc.regularize(model, kernel=rc.l2(1e-4))
    weight, bias = model[0].weight, model[0].bias
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = torch.optim.SGD(
        [{"params": [weight], "weight_decay": 0.0}, {"params": [bias], "weight_decay": 0.1}],
        lr=0.1,
    )
    assert caught(lambda: step(model, plain)) == []
    assert caught(lambda: step(model, groups)) == []


def test_the_forgotten_loss_warning_points_at_the_users_step():
    model = torch.nn.Sequential(rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (w,) = caught(lambda: step(model, opt, with_loss=False))
    assert w.filename == __file__ and "before rc.loss() was ever called" in str(w.message)


# -- Keras regularizer objects --


def keras_regularizers():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="pip install .[test] installs keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras runs on another backend in this process")
    return keras.regularizers


def test_a_keras_regularizer_becomes_the_rc_one_with_its_coefficient():
    kr = keras_regularizers()
    cases = [
        (kr.L2(0.03), rc.L2(0.03)),
        (kr.L1(0.02), rc.L1(0.02)),
        (kr.L1L2(l1=0.01, l2=0.04), rc.L1L2(l1=0.01, l2=0.04)),
        (kr.OrthogonalRegularizer(factor=0.05, mode="columns"), rc.Orthogonal(0.05, "columns")),
    ]
    x = torch.randn(4, 3, dtype=torch.float64)
    for theirs, ours in cases:
        layer = rc.nn.Linear(3, 4, kernel_regularizer=theirs)
        assert layer.kernel_regularizer == ours and repr(layer.kernel_regularizer) == repr(ours)
        expected = float(theirs(x))  # Keras's own value, on the torch backend
        assert float(layer.kernel_regularizer(x)) == pytest.approx(expected, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = torch.nn.Linear(3, 4)
        handle = rc.regularize(model, kernel=kr.L2(0.5))
    assert handle.entries[0].regularizer == rc.L2(0.5)


def test_a_users_keras_subclass_stays_their_function():
    kr = keras_regularizers()

    class L2(kr.Regularizer):  # their own formula, whatever its name
        def __call__(self, x):
            return x.abs().max()

    reg = rc.regularizers.get(L2())
    assert isinstance(reg, rc.regularizers.Custom)


# -- errors that say what was meant --


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: rc.regularize(m, kernal=rc.l2(1e-4)), "'kernal'; did you mean 'kernel'?"),
        (lambda m: rc.regularize(m, bias_regularizer="l2"), "did you mean 'bias'?"),
        (lambda m: rc.l2(l=0.1), "'l'; did you mean 'l2'?"),
        (lambda m: rc.l2(c=0.1), "'c'; l2() takes: l2"),
        (lambda m: rc.L1L2(l_1=0.1), "did you mean 'l1'?"),
        (lambda m: rc.add_regularizer(m, "weight", "l2", colection=None), "'collection'?"),
        (lambda m: rc.summary(tablefmt="github", top_k=3), "did you mean 'top'?"),
        (lambda m: rc.attach_optimizer(None, decouple=True), "did you mean 'decoupled'?"),
        (lambda m: rc.nn.Linear(2, 2, kernal_regularizer="l2"), "'kernel_regularizer'?"),
        (lambda m: rc.nn.Conv2d(1, 1, 3, padding_mod="zeros"), "did you mean 'padding_mode'?"),
        # PyTorch's and Keras 1's words for a kernel and a bias:
        (lambda m: rc.nn.Linear(2, 2, weight_regularizer="l2"), "'kernel_regularizer'?"),
        (lambda m: rc.nn.Conv2d(1, 1, 3, W_regularizer="l2"), "'kernel_regularizer'?"),
        (lambda m: rc.nn.Linear(2, 2, b_regularizer="l2"), "did you mean 'bias_regularizer'?"),
        # A parameter's own name: the argument that covers it on this layer.
        (lambda m: rc.nn.BatchNorm1d(4, weight_regularizer="l2"), "'gamma_regularizer'?"),
        (lambda m: rc.nn.Embedding(4, 2, weight_regularizer="l2"), "'embeddings_regularizer'?"),
        (lambda m: rc.nn.LSTM(2, 2, weight_hh_regularizer="l2"), "'recurrent_regularizer'?"),
        (lambda m: rc.nn.LSTM(2, 2, weight_ih_regularizer="l2"), "'kernel_regularizer'?"),
        (lambda m: rc.nn.GRU(2, 2, bias_hh_regularizer="l2"), "'bias_regularizer'?"),
        (lambda m: rc.regularize(m, weight=rc.l2(1e-4)), "'weight'; did you mean 'kernel'?"),
        (lambda m: rc.regularize(m, weights=rc.l2(1e-4)), "did you mean 'kernel'?"),
    ],
)
def test_a_misspelled_keyword_gets_a_suggestion(call, message):
    with pytest.raises(TypeError, match="unexpected keyword argument") as info:
        call(torch.nn.Linear(2, 2))
    assert message in str(info.value)


def test_an_error_raised_inside_is_not_mistaken_for_a_keyword():
    with pytest.raises(TypeError, match="must be a torch.nn.Module") as info:
        rc.regularize("model", kernel=rc.l2(1e-4))
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("factory", [rc.l2, rc.l1, rc.L2, rc.orthogonal])
def test_a_wrong_coefficient_type_is_a_type_error_naming_what_is_accepted(factory):
    with pytest.raises(TypeError) as info:
        factory("0.1")
    message = str(info.value)
    assert "a schedule" in message and "fn(step) -> float" in message and "'0.1'" in message
    assert isinstance(info.value, ValueError)  # as API.md's contract says, too
    with pytest.raises(ValueError, match="non-negative") as negative:
        factory(-1.0)
    assert not isinstance(negative.value, TypeError)  # a wrong value, not a wrong type


# -- what a type checker and tab completion see --


@pytest.mark.parametrize("module", [rc.nn, rc.regularizers, rc.schedules])
def test_public_modules_list_only_their_api(module):
    assert dir(module) == sorted(module.__all__)
    assert not {"Any", "re", "torch", "inspect", "inert_hook", "math"} & set(dir(module))


def test_nn_exports_only_layers():
    assert all(
        isinstance(getattr(rc.nn, n), type) and issubclass(getattr(rc.nn, n), torch.nn.Module)
        for n in rc.nn.__all__
    )
    assert callable(rc.nn._inert_hook)  # where pickles of regularized models find it


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: rc.nn.Linear(4, 4, bias=False, bias_regularizer=rc.l2(1e-4)),
            r"Linear\(bias_regularizer=L2\(l2=0\.0001\)\) regularizes nothing: the layer has no "
            r"parameter named bias",
        ),
        (
            lambda: rc.nn.LayerNorm(4, elementwise_affine=False, gamma_regularizer="l2"),
            r"LayerNorm\(gamma_regularizer=L2\(l2=0\.01\)\) regularizes nothing: the layer has "
            r"no parameter named weight",
        ),
    ],
)
def test_a_regularizer_for_a_parameter_the_layer_lacks_warns_at_the_users_line(make, message):
    with pytest.warns(rc.RegcollectWarning, match=message) as seen:
        layer = make()
    assert seen[0].filename == __file__
    assert rc.get_collection().entries(layer) == []


def test_assigning_a_regularizer_for_a_parameter_the_layer_lacks_warns_too():
    layer = rc.nn.Linear(4, 4, bias=False)
    with pytest.warns(rc.RegcollectWarning, match=r"Linear\(bias_regularizer=L1\(l1=0\.01\)\)"):
        layer.bias_regularizer = "l1"
    assert layer.bias_regularizer is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.bias_regularizer = None  # removing what is not there: nothing to say


def test_a_scope_default_for_a_parameter_the_layer_lacks_is_silent():
    with rc.scope("net", bias_regularizer=rc.l2(1e-4)), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = rc.nn.Linear(4, 4, bias=False)
    assert rc.get_collection().entries(layer) == []


def test_a_tensor_given_for_a_parameter_name_gets_its_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(
        TypeError,
        match=r"^param_name must be a non-empty string, got Parameter; the model names that "
        r"tensor '0\.weight'$",
    ):
        rc.add_regularizer(model, model[0].weight, rc.l2(0.1))
    with pytest.raises(TypeError, match=r"got 3$"):
        rc.add_regularizer(model, 3, rc.l2(0.1))
