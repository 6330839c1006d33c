import gc

import pytest
import torch

import regcollect as rc


def test_keras_documentation_example():
    layer = rc.nn.Linear(
        5, 5, bias=False, kernel_regularizer=rc.L1(0.01), activity_regularizer=rc.L2(0.01)
    )
    torch.nn.init.ones_(layer.weight)
    layer(torch.ones(5, 5) * 2.0)
    # kernel: 0.01 * 25 = 0.25; activity: 0.01 * 25 * 10**2 / 5 = 5.0
    assert rc.loss().item() == pytest.approx(5.25)


def test_empty_collection():
    total = rc.loss()
    assert total.shape == () and total.dtype == torch.float32 and total.item() == 0.0
    assert rc.get_regularization_losses() == []
    assert rc.Collection().loss().item() == 0.0


def test_loss_value_and_gradient_match_reference():
    model = torch.nn.Sequential(
        rc.nn.Linear(4, 3, kernel_regularizer=rc.l2(0.1), bias_regularizer=rc.l1(0.2)),
        torch.nn.ReLU(),
        rc.nn.Linear(3, 2, kernel_regularizer=rc.l1_l2(0.05, 0.3)),
    )
    w0, b0, w1 = model[0].weight, model[0].bias, model[2].weight
    expected = (
        0.1 * (w0**2).sum() + 0.2 * b0.abs().sum() + 0.05 * w1.abs().sum() + 0.3 * (w1**2).sum()
    )
    total = rc.loss()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    grads = torch.autograd.grad(total, [w0, b0, w1])
    ref = torch.autograd.grad(expected, [w0, b0, w1])
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-6)
    assert rc.get_regularization_loss is rc.loss


def test_sgd_weight_decay_equivalence():
    torch.manual_seed(1)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    mine = torch.nn.Sequential(rc.nn.Linear(6, 8), torch.nn.Tanh(), rc.nn.Linear(8, 1))
    mine.load_state_dict(plain.state_dict())
    wd = 0.1
    for name, _ in mine.named_parameters():
        rc.add_regularizer(mine, name, rc.l2(wd / 2))  # biases included, like weight_decay
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=wd)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    for _ in range(5):
        for model, opt, extra in ((plain, opt_plain, None), (mine, opt_mine, rc.loss)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            opt.step()
    for p, q in zip(plain.parameters(), mine.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_deleted_model_stops_counting():
    keep = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))
    model = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    with pytest.warns(rc.RegcollectWarning, match="2 separate models"):
        both = rc.loss().item()
    assert len(rc.get_collection()) == 2
    del model
    gc.collect()
    assert len(rc.get_collection()) == 1
    assert rc.loss().item() == pytest.approx((keep.weight**2).sum().item())
    assert rc.loss().item() < both


def test_entries_hold_modules_weakly():
    import weakref

    layer = rc.nn.Linear(2, 2, kernel_regularizer="l2", activity_regularizer="l1")
    rc.loss()
    ref = weakref.ref(layer)
    del layer
    gc.collect()
    assert ref() is None
    assert rc.get_collection().entries() == []


def test_reregistration_replaces():
    layer = torch.nn.Linear(3, 3)
    for _ in range(3):  # set-up code run three times
        rc.add_regularizer(layer, "weight", rc.l2(0.5))
    rc.add_regularizer(layer, "weight", rc.l1(0.5))
    assert len(rc.get_collection()) == 1
    assert rc.loss().item() == pytest.approx(0.5 * layer.weight.abs().sum().item())


def test_tied_parameter_counts_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    rc.add_regularizer(model, "emb.weight", rc.l2(1.0))
    rc.add_regularizer(model, "head.weight", rc.l2(1.0))
    assert len(rc.get_collection()) == 1
    assert rc.loss().item() == pytest.approx((emb.weight**2).sum().item(), rel=1e-6)


def test_parameter_tied_after_registration_counts_once():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    rc.add_regularizer(a, "weight", rc.l2(1.0))
    rc.add_regularizer(b, "weight", rc.l2(1.0))
    b.weight = a.weight
    assert rc.loss().item() == pytest.approx((a.weight**2).sum().item(), rel=1e-6)


def test_frozen_parameters_contribute_nothing_until_unfrozen():
    layer = rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0), bias_regularizer=rc.l2(1.0))
    layer.weight.requires_grad_(False)
    assert rc.loss().item() == pytest.approx((layer.bias**2).sum().item())
    layer.weight.requires_grad_(True)
    expected = (layer.bias**2).sum() + (layer.weight**2).sum()
    assert rc.loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_replaced_parameter_is_looked_up_by_name():
    layer = rc.nn.Linear(3, 3, kernel_regularizer=rc.l1(1.0))
    rc.loss()
    layer.weight = torch.nn.Parameter(torch.full((3, 3), 2.0))
    assert rc.loss().item() == pytest.approx(18.0)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # in-place updates are seen without any re-registration
    assert rc.loss().item() == pytest.approx(9.0)


def test_half_precision_parameters():
    layer = rc.nn.Linear(100, 100, kernel_regularizer=rc.l2(1.0), dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(300.0)
    total = rc.loss()
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(300.0**2 * 1e4, rel=1e-3)
    total.backward()
    assert layer.weight.grad.dtype == torch.float16
    assert torch.allclose(layer.weight.grad.float(), torch.full((100, 100), 600.0))


def test_bfloat16_and_float64_mix():
    a = rc.nn.Linear(4, 4, kernel_regularizer=rc.l2(1.0), dtype=torch.bfloat16)
    b = rc.nn.Linear(4, 4, kernel_regularizer=rc.l2(1.0), dtype=torch.float64)
    total = rc.loss([a, b])
    assert total.dtype == torch.float64
    expected = (a.weight.double() ** 2).sum() + (b.weight**2).sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_activity_penalty_semantics():
    layer = rc.nn.Linear(3, 2, activity_regularizer=rc.l2(0.5))
    x = torch.randn(4, 3)
    out = layer(x)
    expected = 0.5 * (out**2).sum() / 4
    assert rc.loss().item() == pytest.approx(expected.item(), rel=1e-6)
    # Reading has no side effect: reads agree until the next forward pass.
    assert rc.loss().item() == pytest.approx(expected.item(), rel=1e-6)
    out2 = layer(2 * x)  # the next pass replaces the one read above
    assert rc.loss().item() == pytest.approx((0.5 * (out2**2).sum() / 4).item(), rel=1e-6)
    twice = torch.nn.ModuleList([layer])
    twice.forward = lambda x: layer(layer(x) @ torch.zeros(2, 3) + x)  # type: ignore[method-assign]
    twice(x)  # one pass calling the layer twice: two penalties
    assert rc.loss().item() == pytest.approx(2 * expected.item(), rel=1e-6)


def test_loss_keeps_no_autograd_graph_alive_once_its_pass_is_done():
    # summary() needs the last values, not their graph: the graph (and the activations it
    # saved) is freed once the pass is done, backpropagated or replaced by the next pass,
    # whatever the caller kept.
    import gc
    import weakref

    layer = rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(0.1), activity_regularizer=rc.l2(0.5))
    for done in ("backward", "next pass"):
        out = layer(torch.randn(4, 3))
        saved = weakref.ref(out)  # saved by the activity penalty's square for its backward
        total = rc.loss()
        if done == "backward":
            (out.sum() + total).backward()
        del out, total
        if done == "next pass":
            layer(torch.randn(4, 3))
        gc.collect()
        assert saved() is None, done
    assert set(rc.penalties()) == {e.name for e in rc.get_collection().entries()} | {"total"}
    assert len(rc.penalties()) == 3


def test_activity_not_recorded_without_gradients():
    layer = rc.nn.Linear(3, 2, activity_regularizer=rc.l2(0.5))
    with torch.no_grad():
        layer(torch.randn(4, 3))
    with torch.inference_mode():
        layer(torch.randn(4, 3))
    assert rc.loss().item() == 0.0


def test_activity_empty_batch_and_gradient():
    layer = rc.nn.Linear(3, 2, activity_regularizer=rc.l1(1.0))
    layer(torch.randn(0, 3))
    assert rc.loss().item() == 0.0
    x = torch.randn(5, 3)
    out = layer(x)
    rc.loss().backward()
    layer2 = torch.nn.Linear(3, 2)
    layer2.load_state_dict(layer.state_dict())
    assert layer.weight.grad is not None
    expected = torch.autograd.grad(layer2(x).abs().sum() / 5, layer2.weight)[0]
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)
    assert out.shape == (5, 2)


def test_activity_rnn_uses_batch_dimension():
    lstm = rc.nn.LSTM(3, 4, activity_regularizer=rc.l2(1.0))  # (seq, batch, feature)
    out, _ = lstm(torch.randn(7, 2, 3))
    assert rc.loss(lstm).item() == pytest.approx(((out**2).sum() / 2).item(), rel=1e-5)
    lstm_bf = rc.nn.GRU(3, 4, batch_first=True, activity_regularizer=rc.l2(1.0))
    out, _ = lstm_bf(torch.randn(2, 7, 3))
    assert rc.loss(lstm_bf).item() == pytest.approx(((out**2).sum() / 2).item(), rel=1e-5)


def test_losses_one_per_entry():
    a = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), bias_regularizer=rc.l1(1.0))
    a(torch.randn(3, 2))
    b = rc.nn.Linear(2, 2, kernel_regularizer=rc.orthogonal(1.0), activity_regularizer="l2")
    b(torch.randn(3, 2))
    losses = rc.get_regularization_losses()
    assert len(losses) == 4  # a.weight, a.bias, b.weight, b:activity
    assert losses[0].item() == pytest.approx((a.weight**2).sum().item(), rel=1e-6)
    assert losses[1].item() == pytest.approx(a.bias.abs().sum().item(), rel=1e-6)
    # Keras's "rows" of a Dense kernel (in, units) are the inputs of torch's (units, in) weight
    want = rc.orthogonal(1.0, "inputs")(b.weight).item()
    assert losses[2].item() == pytest.approx(want, rel=1e-6)
    assert all(t.requires_grad for t in losses)


def test_names_and_scope_filter():
    _lone = rc.nn.Linear(2, 2, kernel_regularizer="l2")
    with rc.scope("encoder"):
        enc = torch.nn.Sequential(
            rc.nn.Linear(2, 2, kernel_regularizer="l2"), rc.nn.Linear(2, 2, kernel_regularizer="l2")
        )
    with rc.scope("decoder"):
        with rc.scope("inner"):
            _dec = torch.nn.Sequential(
                rc.nn.Linear(2, 2, kernel_regularizer="l2", activity_regularizer="l1")
            )
    names = [e.name for e in rc.get_collection().entries()]
    assert names[0].startswith("linear") and names[0].endswith(".weight")
    assert names[1:] == [
        "encoder/0.weight",
        "encoder/1.weight",
        "decoder/inner/0.weight",
        "decoder/inner/0:activity",
    ]
    assert len(rc.get_regularization_losses(scope="encoder/")) == 2
    expected = (enc[0].weight ** 2).sum() + (enc[1].weight ** 2).sum()
    assert rc.loss(scope="encoder").item() == pytest.approx(0.01 * expected.item(), rel=1e-6)
    assert rc.loss(scope="inner").item() == 0.0  # matched at the start, TF-style
    assert len(rc.get_collection().entries(scope=r"decoder/.*activity")) == 1


def test_outermost_model_names_and_stability():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            for _ in range(2):  # appended after the list is attached to the block
                self.layers.append(rc.nn.Linear(2, 2, kernel_regularizer="l2"))

    model = torch.nn.Sequential()
    model.add_module("encoder", Block())
    names = [e.name for e in rc.get_collection().entries()]
    assert names == ["encoder.layers.0.weight", "encoder.layers.1.weight"]
    assert [e.name for e in rc.get_collection().entries()] == names


def test_names_unique_across_models():
    a = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer="l2"))
    b = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer="l2"))
    names = [e.name for e in rc.get_collection().entries()]
    assert names[0] == "0.weight"
    assert names[1] != "0.weight" and names[1].endswith("/0.weight")
    rc.loss([a, b])
    assert set(rc.penalties()) == {names[0], names[1], "total"}
    assert set(rc.penalties(b)) == {"0.weight", "total"}  # within one model: plain names
    assert a is not b


def test_scope_defaults_and_nesting():
    with rc.scope("outer", kernel_regularizer=rc.l2(0.1), activity_regularizer=rc.l1(0.1)):
        a = rc.nn.Linear(2, 2)
        with rc.scope("inner", kernel_regularizer=rc.l1(0.2)):
            b = rc.nn.Linear(2, 2)
            c = rc.nn.Linear(2, 2, kernel_regularizer=None, activity_regularizer=None)
        bn = rc.nn.BatchNorm1d(2)
    assert a.kernel_regularizer == rc.l2(0.1) and a.bias_regularizer is None
    assert a.activity_regularizer == rc.l1(0.1)
    assert b.kernel_regularizer == rc.l1(0.2) and b.activity_regularizer == rc.l1(0.1)
    assert c.kernel_regularizer is None and c.activity_regularizer is None  # explicit None wins
    assert bn.gamma_regularizer is None and bn.activity_regularizer == rc.l1(0.1)


def test_scope_collection_and_bad_arguments():
    coll = rc.Collection()
    with rc.scope("s", collection=coll):
        _layer = rc.nn.Linear(2, 2, kernel_regularizer="l2")
    assert len(coll) == 1 and len(rc.get_collection()) == 0
    assert coll.entries()[0].name.startswith("s/linear") and coll.entries()[0].name.endswith(
        ".weight"
    )
    with pytest.raises(ValueError, match="scope name"):
        with rc.scope(""):
            pass
    with pytest.raises(ValueError, match="l7"):
        with rc.scope("x", kernel_regularizer="l7"):
            pass
    with pytest.raises(ValueError, match="scope must be a valid regular expression"):
        rc.loss(scope="enc[")


def test_independent_collections():
    c1, c2 = rc.Collection(), rc.Collection()
    a = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0), collection=c1)
    b = rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0), collection=c2)
    assert c1.loss().item() == pytest.approx((a.weight**2).sum().item(), rel=1e-6)
    assert c2.loss().item() == pytest.approx(b.weight.abs().sum().item(), rel=1e-6)
    assert rc.loss().item() == 0.0
    assert rc.loss(collection=c1).item() == pytest.approx(c1.loss().item())


def test_handles_and_context_manager():
    layer = torch.nn.Linear(2, 2)
    with rc.add_regularizer(layer, "weight", rc.l2(1.0)) as handle:
        assert len(rc.get_collection()) == 1
        assert len(handle) == 1
    assert len(rc.get_collection()) == 0
    h1 = rc.add_activity_regularizer(layer, rc.l2(1.0))
    layer(torch.randn(2, 2))
    h1.remove()
    assert len(layer._forward_hooks) == 0
    assert rc.loss().item() == 0.0


def test_add_regularizer_errors_name_the_argument():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match=r"no parameter '0\.wieght'.*'0\.weight'"):
        rc.add_regularizer(model, "0.wieght", "l2")
    with pytest.raises(ValueError, match=r"no parameter '0\.bias'"):
        rc.add_regularizer(model, "0.bias", "l2")
    with pytest.raises(ValueError, match=r"no parameter '3\.weight'"):
        rc.add_regularizer(model, "3.weight", "l2")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got Tensor"):
        rc.add_regularizer(torch.ones(2), "weight", "l2")
    with pytest.raises(ValueError, match="unknown regularizer 'l5'"):
        rc.add_regularizer(model, "0.weight", "l5")
    with pytest.raises(ValueError, match="must not be None"):
        rc.add_regularizer(model, "0.weight", None)
    with pytest.raises(TypeError, match="collection must be a regcollect.Collection"):
        rc.add_regularizer(model, "0.weight", "l2", collection="default")


def test_concurrent_registration_counts_each_entry_once(run_in_threads):
    layers = [torch.nn.ModuleList() for _ in range(4)]  # one model per thread

    def build(k):
        for _ in range(100):
            layers[k].append(rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0)))
        rc.loss(layers[k])

    run_in_threads(build, 4)
    assert len(rc.get_collection()) == 400
    expected = sum(layer.weight.abs().sum() for made in layers for layer in made)
    assert rc.loss(layers).item() == pytest.approx(expected.item(), rel=1e-5)
    assert len({e.name for e in rc.get_collection().entries()}) == 400


def test_loss_follows_the_weights_and_a_layer_appended_between_steps():
    model = torch.nn.ModuleList([rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))])

    def check():
        """loss() is the sum of each layer's own formula, and its gradient 2w for each."""
        for layer in model:
            layer.weight.grad = None
        total = rc.loss()
        expected = sum((layer.weight.detach().double() ** 2).sum() for layer in model)
        assert total.item() == pytest.approx(expected.item(), rel=1e-6)
        total.backward()
        for layer in model:
            torch.testing.assert_close(layer.weight.grad, 2 * layer.weight.detach())

    check()
    with torch.no_grad():
        model[0].weight.mul_(3)  # a step: the same parameter, new values
    check()
    torch.nn.Linear(3, 3)  # an unrelated module built between steps changes nothing
    check()
    model.append(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)))
    check()  # the new layer counts from the next loss() on
    assert rc.get_collection().penalties() == pytest.approx(
        {
            "0.weight": (model[0].weight.detach() ** 2).sum().item(),
            "1.weight": (model[1].weight.detach() ** 2).sum().item(),
            "total": sum((layer.weight.detach() ** 2).sum().item() for layer in model),
        },
        rel=1e-6,
    )


def test_parameters_swapped_back_and_forth_each_give_their_own_value_and_gradient():
    # FSDP2 swaps a root module's parameters between two objects every step.
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0))
    a, b = layer.weight, torch.nn.Parameter(layer.weight.detach() * 2)
    for step, p in enumerate((a, b, a, b)):
        layer.weight = p
        other = b if p is a else a
        a.grad = b.grad = None
        total = rc.loss()
        assert total.item() == pytest.approx((p.detach() ** 2).sum().item())
        total.backward()
        torch.testing.assert_close(p.grad, 2 * p.detach())
        assert other.grad is None  # the swapped-out parameter is not in this step's penalty
        with torch.no_grad():
            p.add_(step + 1.0)  # each object keeps its own values between its steps


def test_losses_follow_registration_order_with_activity_entries():
    model = torch.nn.Sequential(
        rc.nn.Linear(2, 2, activity_regularizer=rc.l1(1.0)),
        rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(1.0)),
    )
    out0 = model[0](torch.randn(3, 2))
    model[1](out0)
    losses = rc.get_regularization_losses(model)
    names = [e.name for e in rc.get_collection().entries(model)]
    assert names == ["0:activity", "1.weight"]
    assert losses[0].item() == pytest.approx((out0.abs().sum() / 3).item(), rel=1e-6)
    assert losses[1].item() == pytest.approx((model[1].weight ** 2).sum().item(), rel=1e-6)


def test_importing_regcollect_hooks_nothing_into_torch_and_the_hooks_come_with_the_first_entry():
    """``import regcollect`` leaves every one of torch's process-wide hook tables alone. The
    first entry installs the optimizer-step hooks (the forgotten-loss warning, the schedules'
    real updates) and the module-registration hook (entry names); a model built before that is
    named from its root from its first call on; the hooks can be taken out again."""
    import subprocess
    import sys

    code = """
import torch
from torch.nn.modules import module as m
from torch.optim import optimizer as o
TABLES = [getattr(m, n) for n in dir(m) if n.startswith("_global_") and n.endswith("hooks")]
TABLES += [o._global_optimizer_pre_hooks, o._global_optimizer_post_hooks]
sizes = lambda: [len(t) for t in TABLES]
before = sizes()
import regcollect as rc
from regcollect._state import remove_hooks
assert len(TABLES) >= 9 and sizes() == before, ("hooked at import", before, sizes())
model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
assert sizes() == before
rc.add_regularizer(model[1][0], "weight", rc.l2(rc.schedules.warmup(0.1, steps=2)))
# Built before regcollect was used: where the layer sits is learnt at its first call
# (no scan of the heap at import or at registration).
assert [e.name for e in rc.get_collection().entries()] == ["linear.weight"]
model(torch.ones(1, 2))
assert [e.name for e in rc.get_collection().entries()] == ["1.0.weight"]
added = [a - b for a, b in zip(sizes(), before)]
# the optimizer-step hooks (before: nesting; after: schedules and the forgotten loss()) and
# one module-registration hook
assert sum(added) == 3, added
wrapped = torch.nn.Sequential(model)  # built after: followed by the hook
assert [e.name for e in rc.get_collection().entries()] == ["0.1.0.weight"]
opt = torch.optim.SGD(model.parameters(), lr=0.1)
(model(torch.ones(1, 2)).sum() + rc.loss()).backward()
opt.step()
assert rc.get_collection().entries()[0].regularizer.l2.step == 1  # the schedule followed
remove_hooks()
assert sizes() == before
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
