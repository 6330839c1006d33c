"""Issue 13's cases: each once gave a silent wrong number, a crash or an unclear error."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.nn.utils import parametrize

import regcollect as rc
from regcollect.compat import v1

# Documented (docs/performance.md): 16 or more small CPU tensors of one shape are stacked.
STACK_MIN = 16


@rc.register("hardening_MeanL2")
class MeanL2(rc.L2):
    """A subclass that changes the formula but inherits L2's terms()."""

    def __call__(self, x):
        return self.l2 * x.float().pow(2).mean()


def test_subclass_overriding_call_is_not_fused_as_its_parent():
    layer = torch.nn.Sequential(rc.nn.Linear(10, 10, kernel_regularizer=MeanL2(0.01)))
    want = 0.01 * (layer[0].weight ** 2).mean()
    assert rc.loss().item() == pytest.approx(want.item(), rel=1e-6)


def test_channels_last_small_conv_kernels_on_the_stacked_path():
    model = torch.nn.Sequential(
        *[rc.nn.Conv2d(2, 2, 3, kernel_regularizer=rc.l2(0.1)) for _ in range(STACK_MIN)]
    ).to(memory_format=torch.channels_last)
    total = rc.loss()
    want = sum(0.1 * (m.weight**2).sum() for m in model)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    total.backward()
    assert torch.allclose(model[0].weight.grad, 0.2 * model[0].weight.detach())


def test_shape_changed_through_data_structured_pruning():
    model = torch.nn.ModuleList(
        rc.nn.Linear(4, 4, bias_regularizer=rc.l1(1.0)) for _ in range(STACK_MIN)
    )
    rc.loss()
    with torch.no_grad():
        model[3].bias.data = model[3].bias.data[:2]  # pruned to 2 outputs
    want = sum(m.bias.abs().sum() for m in model)
    assert rc.loss().item() == pytest.approx(want.item(), rel=1e-6)


def test_sparse_embedding_with_a_weight_regularizer_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"sparse=True.*activity_regularizer"):
        rc.nn.Embedding(10, 3, sparse=True, embeddings_regularizer=rc.l2(1e-3))
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True))
    with pytest.raises(ValueError, match=r"'0\.weight'.*sparse=True"):
        rc.regularize(model, embeddings=rc.l2(1e-3))
    # What the message offers instead: the rows looked up, through the output.
    emb = rc.nn.Embedding(10, 3, sparse=True, activity_regularizer=rc.l2(1e-3))
    out = emb(torch.tensor([[1, 2]]))
    rc.loss(emb).backward()
    assert emb.weight.grad.is_sparse and out.shape == (1, 2, 3)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: rc.l2(10**400),
            ValueError,
            r"l2 must be a non-negative finite real number.*10{20}",
        ),
        (
            lambda: rc.nn.Linear(2, 2, kernel_regularizer="Sum"),
            ValueError,
            r"'Sum' needs arguments",
        ),
        (lambda: rc.regularizers.get("l7"), ValueError, r"unknown regularizer 'l7'"),
        (lambda: rc.orthogonal(1.0)(torch.ones(0, 5)), None, None),
    ],
)
def test_clear_errors(call, error, pattern):
    if error is None:
        assert call().item() == 0.0
        return
    with pytest.raises(error, match=pattern):
        call()


def test_unknown_regularizer_message_lists_only_what_a_string_can_build():
    with pytest.raises(ValueError) as info:
        rc.regularizers.get("l7")
    assert "'Sum'" not in str(info.value) and "'l1_l2'" in str(info.value)


def test_factories_and_classes_passed_uncalled_behave_alike():
    for factory, cls in ((rc.l2, rc.L2), (rc.l1, rc.L1), (rc.l1_l2, rc.L1L2)):
        assert type(rc.regularizers.get(factory)) is cls
    assert rc.nn.Linear(2, 2, kernel_regularizer=rc.l2).kernel_regularizer == rc.l2()
    assert rc.nn.Linear(2, 2, kernel_regularizer=rc.L2).kernel_regularizer == rc.L2()


def test_apply_regularization_takes_any_iterable():
    model = torch.nn.Linear(3, 2)
    total = v1.apply_regularization(v1.l2_regularizer(0.5), model.parameters())
    want = 0.25 * ((model.weight**2).sum() + (model.bias**2).sum())
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_deeply_nested_plan_names_the_entry():
    reg = {"class_name": "L2", "config": {"l2": 0.1}}
    for _ in range(500):  # what a hostile file could hold
        reg = {"class_name": "Sum", "config": {"regularizers": [reg]}}
    plan = {
        "format": "regcollect.plan",
        "version": 1,
        "entries": [{"module": "", "param": "weight", "scope": "", "regularizer": reg}],
    }
    with pytest.raises(ValueError, match=r"plan\['entries'\]\[0\]\['regularizer'\].*nested"):
        rc.load_plan(torch.nn.Linear(2, 2), plan, collection=rc.Collection())


def test_meta_model_next_to_the_real_one():
    real = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    with torch.device("meta"):
        shadow = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    with pytest.warns(rc.RegcollectWarning, match="meta"):
        total = rc.loss()
    assert total.device.type == "cpu"
    assert total.item() == pytest.approx((real[0].weight ** 2).sum().item(), rel=1e-6)
    total.backward()
    assert real[0].weight.grad is not None and shadow[0].weight.grad is None


def test_scoped_loss_follows_its_weights_while_unrelated_modules_are_built():
    model = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    helpers = []
    for _ in range(5):
        square = (model[0].weight.detach() ** 2).sum().item()
        assert rc.loss(scope="0").item() == pytest.approx(square, rel=1e-6)
        opt.zero_grad()
        total = rc.loss(model)
        assert total.item() == pytest.approx(square, rel=1e-6)
        total.backward()
        torch.testing.assert_close(model[0].weight.grad, 2 * model[0].weight.detach())
        opt.step()
        # e.g. a metric or a helper built per step, one with a regularizer outside the model
        helpers.append(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        helpers.append(rc.nn.Linear(2, 2, kernel_regularizer=rc.l1(1.0)))


def test_summary_formats_missing_values_and_has_a_short_repr():
    model = torch.nn.Sequential(rc.nn.Linear(3, 3, kernel_regularizer=rc.l2(1.0)))
    rc.loss()
    rc.add_regularizer(model, "0.bias", rc.l1(0.5))  # registered after the last loss(): "-"
    text = rc.summary(file=io.StringIO())
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert rows["0.bias"][3] == "-" and rows["0.bias"][4] == "-"
    value = (model[0].weight ** 2).sum().item()
    assert rows["0.weight"][3] == f"{value:.6g}" and rows["0.weight"][4] == "100.00%"
    assert repr(text).startswith("<regcollect summary") and str(text) == text


class Holder(torch.nn.Module):
    """A user model with a submodule literally named ``module`` (not a wrapper)."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 2)


def test_a_submodule_named_module_is_not_taken_for_a_wrapper():
    model = Holder()
    handle = rc.regularize(model, kernel=rc.l2(1.0), include=["module.*"])
    assert [e.name for e in handle.entries] == ["module.weight"]
    handle.remove()
    handle = rc.regularize(model, kernel=rc.l2(1.0), exclude=["module.*"])
    assert [e.name for e in handle.entries] == ["head.weight"]
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l1(0.5), collection=coll)
    plan = rc.export_plan(model, collection=coll)
    assert [e["module"] for e in plan["entries"]] == ["module", "head"]
    fresh, other = Holder(), rc.Collection()
    rc.load_plan(fresh, plan, collection=other)
    first = other.entries()[0]
    assert first.module is fresh.module and first.param == "weight"


def test_real_wrappers_are_still_transparent():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapped = torch.nn.DataParallel(model)  # holds the model as .module
    handle = rc.regularize(wrapped, kernel=rc.l2(1.0), include=["0.*"])
    assert [e.name for e in handle.entries] == ["0.weight"]
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.l2(1.0), collection=coll)
    assert rc.export_plan(wrapped, collection=coll)["entries"][0]["module"] == "0"


@pytest.mark.parametrize(
    ("apply", "originals"),
    [
        (torch.nn.utils.parametrizations.weight_norm, ["original0", "original1"]),
        (torch.nn.utils.parametrizations.spectral_norm, ["original"]),
        (lambda m: parametrize.register_parametrization(m, "weight", Double()), ["original"]),
        (torch.nn.utils.weight_norm, ["weight_g", "weight_v"]),  # the older, hook-based form
    ],
)
def test_weight_parametrized_after_the_layer_is_built(apply, originals):
    model = torch.nn.Sequential(rc.nn.Linear(4, 3, kernel_regularizer=rc.l2(0.1)))
    rc.loss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm
        apply(model[0])
    layer = model[0]
    holder = layer.parametrizations.weight if hasattr(layer, "parametrizations") else layer
    tensors = [getattr(holder, n) for n in originals]
    want = sum(0.1 * (t**2).sum() for t in tensors)
    total = rc.loss()
    assert total.item() == pytest.approx(want.item(), rel=1e-6) and total.item() > 0
    total.backward()
    assert all(t.grad is not None for t in tensors)
    assert layer.kernel_regularizer == rc.l2(0.1)  # still what the layer reports
    text = rc.summary(file=io.StringIO())
    assert "output" not in text and len(text.splitlines()) == 3 + len(originals)


class Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_re_registering_every_step_keeps_no_replaced_entries_alive():
    """A hand-made schedule re-registers with a new coefficient every step and drops the
    handle: what was replaced can no longer be restored by anyone, so it must not be kept
    (it was: each entry held the one before it, +25 MiB per 20k steps). A handle that is
    kept still restores what its registration replaced."""
    import gc

    from regcollect import Entry

    layer = torch.nn.Linear(4, 4)
    coll = rc.Collection()
    kept = rc.add_regularizer(layer, "weight", rc.l1(0.5), collection=coll)

    def live_entries():
        gc.collect()
        return sum(type(o) is Entry for o in gc.get_objects())

    before = live_entries()
    for step in range(500):
        rc.add_regularizer(layer, "weight", rc.l2(0.01 * (step + 1)), collection=coll)
    assert live_entries() <= before + 2
    assert coll.loss().item() == pytest.approx(5.0 * (layer.weight**2).sum().item(), rel=1e-6)
    # The first registration's handle is alive: removing the newest restores what it replaced.
    with rc.add_regularizer(layer, "weight", rc.l2(1.0), collection=coll):
        pass
    assert [e.regularizer for e in coll.entries()] == [rc.l2(5.0)]
    kept.remove()  # replaced long ago: removing it changes nothing now
    assert [e.regularizer for e in coll.entries()] == [rc.l2(5.0)]
