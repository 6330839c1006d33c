"""Adversarial checks: bad input, non-finite values, mixed precision, threads, faults, loading.

docs/reliability.md lists what each test tries; keep the two in step.
"""

from __future__ import annotations

import gc
import io
import warnings

import pytest
import torch

import regcollect as rc


def mlp(coll=None, **regs):
    regs = regs or {"kernel_regularizer": rc.l2(0.1), "bias_regularizer": rc.l1(0.01)}
    kwargs = {"collection": coll} if coll is not None else {}
    return torch.nn.Sequential(
        rc.nn.Linear(4, 8, **regs, **kwargs), torch.nn.ReLU(), rc.nn.Linear(8, 2, **regs, **kwargs)
    )


def reference(model, l2=0.1, l1=0.01):
    return sum(
        l2 * (m.weight.double() ** 2).sum() + l1 * m.bias.double().abs().sum()
        for m in model
        if isinstance(m, torch.nn.Linear)
    )


# --- bad input, everywhere public ---------------------------------------------------------------

LINEAR = torch.nn.Sequential(torch.nn.Linear(2, 2))

BAD_INPUT = [
    # (call, exception, pattern the message must contain)
    (
        lambda: rc.add_regularizer(LINEAR, "0.wieght", rc.l2()),
        ValueError,
        r"'0\.wieght'.*0\.weight",
    ),
    (lambda: rc.add_regularizer(LINEAR, "", rc.l2()), TypeError, "param_name"),
    (
        lambda: rc.add_regularizer("model", "weight", rc.l2()),
        TypeError,
        "module must be a torch.nn.Module, got str",
    ),
    (
        lambda: rc.add_activity_regularizer(42, rc.l2()),
        TypeError,
        "module must be a torch.nn.Module, got int",
    ),
    (lambda: rc.regularize([LINEAR], kernel=rc.l2()), TypeError, "torch.nn.Module, got list"),
    (lambda: rc.add_regularizer(LINEAR, "0.weight", 0.5), ValueError, r"0\.5"),
    (lambda: rc.add_regularizer(LINEAR, "0.weight", "l3"), ValueError, "unknown regularizer 'l3'"),
    (
        lambda: rc.add_regularizer(LINEAR, "0.weight", None),
        ValueError,
        "regularizer must not be None",
    ),
    (lambda: rc.nn.Linear(2, 2, kernel_regularizer=1e-4), ValueError, r"0\.0001"),
    (lambda: rc.l2(-1.0), ValueError, "l2 must be a non-negative finite real number"),
    (lambda: rc.l1("0.1"), ValueError, r"l1 must be .*'0\.1' of type str"),
    (lambda: rc.l2(True), ValueError, "l2 must be .*True of type bool"),
    (lambda: rc.l1_l2(l1=float("nan")), ValueError, "l1 must be .*nan"),
    (lambda: rc.orthogonal(factor=float("inf")), ValueError, "factor must be .*inf"),
    (lambda: rc.orthogonal(mode="diagonal"), ValueError, "mode must be .*'diagonal'"),
    (
        lambda: rc.regularize(LINEAR, kernel=rc.l2(), include="*.weight"),
        TypeError,
        r"include must be a list of glob patterns.*'\*\.weight'",
    ),
    (
        lambda: rc.regularize(LINEAR, kernel=rc.l2(), exclude=[3]),
        TypeError,
        "exclude must contain strings, got 3",
    ),
    (
        lambda: rc.loss(scope="encoder/("),
        ValueError,
        r"scope must be a valid regular expression, got 'encoder/\('",
    ),
    (
        lambda: rc.loss(scope=3),
        TypeError,
        "scope must be a regular expression string, an nn.Module or a list of nn.Modules, got int 3",
    ),
    (lambda: rc.loss(scope=["a"]), TypeError, "scope must be .* got a list containing str 'a'"),
    (lambda: rc.loss(scope=[]), ValueError, "scope must not be an empty list"),
    (lambda: rc.summary(tablefmt="nope"), ValueError, "tablefmt.*'nope'"),
    (
        lambda: rc.loss(collection="default"),
        TypeError,
        "collection must be a regcollect.Collection, got str",
    ),
    (
        lambda: rc.Collection(check_finite="yes"),
        TypeError,
        "check_finite must be a bool, got 'yes'",
    ),
    (lambda: rc.scope(""), ValueError, "scope name"),
    (
        lambda: rc.regularizers.deserialize({"class_name": "os.system"}),
        ValueError,
        "unknown regularizer class_name 'os.system'",
    ),
]


@pytest.mark.parametrize(("call", "error", "pattern"), BAD_INPUT)
def test_bad_input_names_argument_expected_and_received(call, error, pattern):
    with pytest.raises(error, match=pattern):
        result = call()
        if hasattr(result, "__enter__"):  # rc.scope checks its arguments when entered
            result.__enter__()


@pytest.mark.parametrize(
    ("fn", "error", "pattern"),
    [
        (lambda w: 1.0, TypeError, "must return a torch.Tensor, got float"),
        (lambda w: w * 2, ValueError, r"must return a scalar tensor, got shape \(2, 3\)"),
        (lambda w: torch.zeros((), device="meta"), ValueError, "returned a tensor on meta"),
    ],
)
def test_bad_custom_regularizer_result_names_the_entry(fn, error, pattern):
    _model = torch.nn.Sequential(rc.nn.Linear(3, 2, kernel_regularizer=fn))
    with pytest.raises(error, match=r"entry '0\.weight': .*" + pattern):
        rc.loss()
    with pytest.raises(error, match=r"entry '0\.weight'"):
        rc.get_regularization_losses()


def test_bad_custom_activity_regularizer_names_the_entry():
    model = torch.nn.Sequential(rc.nn.Linear(3, 2, activity_regularizer=lambda out: out))
    with pytest.raises(ValueError, match=r"entry '0:activity': .*scalar tensor"):
        model(torch.randn(4, 3))


# --- non-finite values are never hidden ----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_makes_loss_non_finite_and_is_named(bad):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = bad
    total = rc.loss()
    assert not torch.isfinite(total)
    table = rc.summary(file=io.StringIO())
    row = next(line for line in table.splitlines() if line.startswith("2.weight"))
    assert "(!)" in row
    assert all("(!)" not in line for line in table.splitlines() if line.startswith("0."))
    with pytest.raises(FloatingPointError, match=r"1 entry: '2\.weight' \((nan|inf)\)"):
        rc.assert_finite()


def test_check_finite_opt_in_raises_on_every_loss():
    coll = rc.Collection(check_finite=True)
    model = mlp(coll)
    coll.loss()  # finite: no error
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'0\.bias' \(nan\)"):
        coll.loss()
    coll.check_finite = False
    assert torch.isnan(coll.loss())


def test_non_finite_activity_is_named():
    coll = rc.Collection(check_finite=True)
    model = torch.nn.Sequential(
        rc.nn.Linear(2, 2, activity_regularizer=rc.l2(1.0), collection=coll)
    )
    model(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(FloatingPointError, match=r"'0:activity' \(inf\)"):
        coll.loss()


# --- mixed precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_never_overflow(dtype, device):
    layer = rc.nn.Linear(300, 300, kernel_regularizer=rc.l2(1.0), dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.fill_(200.0)  # 200**2 * 90000 = 3.6e9, far beyond float16's 65504
    total = rc.loss()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert total.item() == pytest.approx(3.6e9, rel=1e-6)
    total.backward()
    assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.weight.grad).all()


def test_autocast_block_gives_the_float32_penalty(device):
    model = mlp().to(device)
    expected = reference(model).item()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(torch.randn(5, 4, device=device))
        total = rc.loss()
    assert out.dtype == torch.bfloat16
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_grad_scaler_flow_matches_unscaled_training(device):
    x, y = torch.randn(16, 4, device=device), torch.randn(16, 2, device=device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16

    def train(use_scaler):
        rc.get_collection().clear()
        torch.manual_seed(0)
        model = mlp().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12, enabled=use_scaler)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast(device.type, dtype=half):
                data = torch.nn.functional.mse_loss(model(x).float(), y)
            total = data + rc.loss()  # the penalty is added outside autocast, in float32
            scaler.scale(total).backward()
            scaler.unscale_(opt)  # gradients are unscaled before clipping or inspection
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    for scaled, plain in zip(train(True), train(False)):
        assert torch.allclose(scaled, plain, rtol=1e-5, atol=1e-6)


# --- concurrency -----------------------------------------------------------------------------------


def test_eight_threads_registering_300_layers_each_while_computing_loss(run_in_threads):
    coll = rc.Collection()
    layers = [torch.nn.ModuleList() for _ in range(8)]  # one model per thread

    def work(k):
        for i in range(300):
            layers[k].append(rc.nn.Linear(3, 3, kernel_regularizer=rc.l1(1.0), collection=coll))
            if i % 30 == 0:
                assert torch.isfinite(coll.loss(layers[k]))
                coll.penalties(layers[k])

    run_in_threads(work, 8)
    everything = [layer for group in layers for layer in group]
    assert len(coll) == 2400
    expected = sum(layer.weight.detach().double().abs().sum() for layer in everything)
    assert coll.loss(layers).item() == pytest.approx(expected.item(), rel=1e-6)
    names = [e.name for e in coll.entries()]
    assert len(set(names)) == 2400
    assert len(coll.penalties(layers)) == 2401  # every entry once, plus the total


# --- faults during training --------------------------------------------------------------------------


def sgd_steps(model, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (model(torch.randn(3, 4)).sum() + rc.loss()).backward()
        opt.step()


def test_module_deleted_mid_training_stops_counting():
    model = mlp()
    sgd_steps(model)
    del model[2]  # the last layer is gone (and garbage)
    gc.collect()
    assert sorted(e.name for e in rc.get_collection().entries()) == ["0.bias", "0.weight"]
    expected = (
        0.1 * (model[0].weight.double() ** 2).sum() + 0.01 * model[0].bias.double().abs().sum()
    )
    assert rc.loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_parameter_replaced_mid_training_is_followed():
    model = mlp()
    sgd_steps(model)
    model[0].weight = torch.nn.Parameter(torch.full((8, 4), 2.0))
    assert rc.loss().item() == pytest.approx(reference(model).item(), rel=1e-6)
    sgd_steps(model)  # a fresh optimizer over the new parameter trains fine
    assert rc.loss().item() == pytest.approx(reference(model).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_to_dtype(dtype, device):
    model = mlp()
    sgd_steps(model)
    model.to(device=device, dtype=dtype)
    total = rc.loss()
    assert total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert total.item() == pytest.approx(reference(model).item(), rel=1e-6)
    total.backward()
    assert model[0].weight.grad.dtype == dtype


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_after_registration(assign):
    model, source = (
        mlp(),
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    )
    model.load_state_dict(source.state_dict(), assign=assign)
    assert rc.loss().item() == pytest.approx(reference(source).item(), rel=1e-6)
    assert len(rc.get_collection()) == 4


def test_functional_call_inside_the_wrapped_forward_penalises_the_given_parameters():
    model = mlp()

    class WithPenalty(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), rc.loss()

    wrapped = WithPenalty(model)
    params = {k: v.detach() * 3 for k, v in wrapped.named_parameters()}
    x = torch.randn(5, 4)

    def objective(p):
        out, penalty = torch.func.functional_call(wrapped, p, (x,))
        return out.pow(2).mean() + penalty

    grads = torch.func.grad(objective)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    h = torch.relu(torch.nn.functional.linear(x, leaves["inner.0.weight"], leaves["inner.0.bias"]))
    out = torch.nn.functional.linear(h, leaves["inner.2.weight"], leaves["inner.2.bias"])
    penalty = sum(
        0.1 * (leaves[f"inner.{i}.weight"] ** 2).sum()
        + 0.01 * leaves[f"inner.{i}.bias"].abs().sum()
        for i in (0, 2)
    )
    (out.pow(2).mean() + penalty).backward()
    for k in params:
        assert torch.allclose(grads[k], leaves[k].grad, atol=1e-6)
    # Outside any functional_call, the module's own parameters count again.
    assert rc.loss().item() == pytest.approx(reference(model).item(), rel=1e-6)


# --- forgotten loss() -----------------------------------------------------------------------------------


def test_forgotten_loss_warns_once_naming_an_entry():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(
        rc.RegcollectWarning,
        match=r"4 regularization penalties \(e\.g\. '0\.weight'\).*SGD\.step\(\) ran before rc\.loss\(\)",
    ):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only


def test_forgotten_loss_of_one_penalty_reads_in_the_singular():
    model = torch.nn.Sequential(rc.nn.Linear(4, 2, kernel_regularizer=rc.l2(0.1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(
        rc.RegcollectWarning,
        match=r"^1 regularization penalty \('0\.weight'\) is registered, but SGD",
    ):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()


def test_no_warning_when_loss_is_used_or_optimizer_is_unrelated():
    model = mlp()
    other = torch.nn.Linear(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.SGD(other.parameters(), lr=0.1).step()  # not regularized parameters
        opt = torch.optim.Adam(model.parameters())
        (model(torch.randn(2, 4)).sum() + rc.loss()).backward()
        opt.step()


# -- issue 26, item 10: each a right value or a clear error ---------------------------------


def test_equal_regularizers_hash_alike():
    assert len({rc.L2(0.1), rc.L2(0.1)}) == 1
    assert len({rc.L2(0.1), rc.L2(0.2), rc.L1(0.1)}) == 3
    assert {rc.l1_l2(0.1, 0.2): "a"}[rc.L1L2(0.1, 0.2)] == "a"


def test_a_function_of_the_weights_given_as_a_coefficient_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"l2 .*schedule fn\(step\).*raised AttributeError.*"
        r"kernel_regularizer=fn",
    ):
        rc.l2(lambda w: w.abs().sum())
    assert float(rc.l2(lambda step: 0.5 * step).l2) == 0.0  # a real schedule still works


def test_a_root_parameter_named_total_keeps_its_row_in_penalties():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.total = torch.nn.Parameter(torch.ones(2))
            self.layer = torch.nn.Linear(2, 2)

    net = Net()
    coll = rc.Collection()
    rc.add_regularizer(net, "total", rc.l2(1.0), collection=coll)
    rc.add_regularizer(net.layer, "weight", rc.l2(1.0), collection=coll)
    value = coll.loss().item()
    got = coll.penalties()
    assert got["total"] == pytest.approx(2.0)  # the parameter's own penalty, 1.0 * (1 + 1)
    totals = [k for k in got if k.startswith("total")]
    assert sorted(totals) == ["total", "total (sum)"] and got["total (sum)"] == pytest.approx(value)


def test_an_l2sp_shape_error_names_the_qualified_parameter():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        rc.regularize(model, kernel=rc.L2SP(0.1, reference={"2.weight": torch.ones(5, 5)}))


def test_tensorboard_accepts_a_numpy_integer_step(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e .[tensorboard]")
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from regcollect.integrations.tensorboard import log_penalties

    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.1))
    rc.loss(layer)
    with SummaryWriter(tmp_path) as writer:
        log_penalties(writer, np.int64(3))  # what enumerate over a numpy array gives
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            log_penalties(writer, np.float64(3.5))


def test_regularize_on_a_lazy_model_before_its_first_forward_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"lazy parameters .*\['0.weight', '0.bias'\].*forward"):
        rc.regularize(model, kernel=rc.l2(0.1))
    assert len(rc.get_collection()) == 0  # nothing registered
    model(torch.ones(1, 4))  # materialized: now it works
    rc.regularize(model, kernel=rc.l2(0.1))
    want = 0.1 * sum((model[i].weight.detach() ** 2).sum().item() for i in (0, 2))
    assert rc.loss().item() == pytest.approx(want, rel=1e-6)
