"""persist: a model's plan as JSON and back (safely), and copies of regularized layers.

Copies (pickle, deepcopy, torch.save) of ``rc.nn`` layers are covered in ``test_nn.py``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import regcollect as rc

# --- export_plan / load_plan ---------------------------------------------------------------------


@rc.register("reliability_Scaled")
class Scaled(rc.Regularizer):
    def __init__(self, factor=1.0):
        self.factor = factor

    def __call__(self, x):
        return self.factor * x.float().pow(4).sum()

    def get_config(self):
        return {"factor": self.factor}


def build_for_plan(coll):
    with rc.scope("enc"):
        model = torch.nn.Sequential(
            rc.nn.Linear(
                4, 6, kernel_regularizer=rc.l1_l2(0.1, 0.2), bias_regularizer="l1", collection=coll
            ),
            torch.nn.Tanh(),
            rc.nn.Linear(
                6,
                3,
                kernel_regularizer=rc.orthogonal(0.3, mode="columns"),
                activity_regularizer=rc.l2(1e-3),
                collection=coll,
            ),
        )
    rc.add_regularizer(model, "2.bias", Scaled(0.5), collection=coll)
    return model


def test_plan_round_trips_through_json_by_names():
    source_coll = rc.Collection()
    source = build_for_plan(source_coll)
    text = json.dumps(rc.export_plan(source, collection=source_coll))
    target = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    target.load_state_dict(source.state_dict())
    coll = rc.Collection()
    handle = rc.load_plan(target, json.loads(text), collection=coll)
    assert len(handle) == 5
    want = {e.name: e.regularizer for e in source_coll.entries()}
    got = {e.name: e.regularizer for e in coll.entries()}
    assert got == want
    assert set(got) == {"enc/0.weight", "enc/0.bias", "enc/2.weight", "enc/2:activity", "2.bias"}
    x = torch.randn(7, 4)
    source(x), target(x)
    assert coll.loss().item() == pytest.approx(source_coll.loss().item(), rel=1e-6)
    # Loading again replaces, never double counts.
    rc.load_plan(target, json.loads(text), collection=coll)
    assert len(coll) == 5


def test_plan_export_through_wrappers_and_errors():
    coll = rc.Collection()
    model = build_for_plan(coll)
    wrapped = torch.compile(model)  # names inside the wrapper carry "_orig_mod."
    assert rc.export_plan(wrapped, collection=coll) == rc.export_plan(model, collection=coll)
    rc.add_regularizer(model, "0.bias", lambda b: b.sum() ** 2, collection=coll)
    with pytest.raises(TypeError, match=r"cannot export entry '0\.bias'.*register"):
        rc.export_plan(model, collection=coll)


def _good_entry(**changes):
    entry = {
        "module": "0",
        "param": "weight",
        "scope": "",
        "regularizer": {"class_name": "L2", "config": {"l2": 0.1}},
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


def _plan(*entries, **top):
    return {"format": "regcollect.plan", "version": 1, "entries": list(entries), **top}


MALICIOUS = [
    ("not a dict", TypeError, "plan must be a dict"),
    ({"format": "regcollect.plan", "version": 1}, ValueError, "exactly the keys"),
    (_plan(extra="x"), ValueError, "exactly the keys"),
    ({"format": "pickle", "version": 1, "entries": []}, ValueError, "format 'pickle'"),
    ({"format": "regcollect.plan", "version": "1", "entries": []}, ValueError, "version '1'"),
    ({"format": "regcollect.plan", "version": 1, "entries": {}}, TypeError, "must be a list"),
    (_plan("0.weight"), TypeError, r"plan\['entries'\]\[1\] must be a dict"),
    (
        _plan(_good_entry(code="__import__('os').system('true')")),
        ValueError,
        r"unknown keys \['code'\]",
    ),
    (
        _plan(_good_entry(regularizer={"class_name": "os.system", "config": {}})),
        ValueError,
        "unknown regularizer class_name 'os.system'",
    ),
    (
        _plan(
            _good_entry(
                regularizer={"class_name": "builtins.eval", "module": "builtins", "config": {}}
            )
        ),
        ValueError,
        "unknown regularizer class_name",
    ),
    (
        _plan(_good_entry(regularizer={"class_name": "L2", "config": {"l2": "__import__('os')"}})),
        ValueError,
        "l2 must be a non-negative",
    ),
    (
        _plan(_good_entry(regularizer={"class_name": "L2", "config": {"__class__": 1}})),
        ValueError,
        "bad config for regularizer 'L2'",
    ),
    (_plan(_good_entry(regularizer="lambda w: w")), TypeError, r"\[1\]\['regularizer'\]: .*dict"),
    (_plan(_good_entry(module="__class__")), ValueError, "has no module '__class__'"),
    (_plan(_good_entry(module="0.__globals__")), ValueError, "has no module"),
    (_plan(_good_entry(param="__dict__")), ValueError, "has no parameter '__dict__'"),
    (_plan(_good_entry(param="training")), ValueError, "has no parameter 'training'"),
    (_plan(_good_entry(module=["0"])), TypeError, r"\['module'\] must be a string"),
    (_plan(_good_entry(scope="../")), ValueError, None),
    (_plan(_good_entry(activity=True)), ValueError, "either 'param' or 'activity'"),
    (_plan(_good_entry(param=_DROP)), ValueError, "either 'param' or 'activity'"),
    (
        _plan(_good_entry(param=_DROP, activity="yes")),
        TypeError,
        r"\['activity'\] must be true or false",
    ),
    (_plan(_good_entry(scope=7)), ValueError, r"\['scope'\] must be"),
    # Configs that deserialise but cannot be registered: refused before anything is.
    (
        _plan(_good_entry(regularizer={"class_name": "L2SP", "config": {"reference": {}}})),
        ValueError,
        "L2SP reference is not configuration",
    ),
    (
        _plan(_good_entry(regularizer={"class_name": "GroupLasso", "config": {"axis": 5}})),
        ValueError,
        r"\[1\].*axis=5 is out of range for a tensor of shape \(2, 2\)",
    ),
    (
        _plan(
            _good_entry(
                regularizer={"class_name": "OrthogonalRegularizer", "config": {}}, param="bias"
            )
        ),
        ValueError,
        r"\[1\].*rank >= 2",
    ),
    # 6 KiB of JSON must not make every step cost a thousand penalties.
    (
        _plan(
            _good_entry(
                regularizer={"class_name": "Sum", "config": {"regularizers": ["l2"] * 1000}}
            )
        ),
        ValueError,
        "Sum of 1000 regularizers; at most 64",
    ),
]


@pytest.mark.parametrize(("plan", "error", "pattern"), MALICIOUS)
def test_malicious_plan_is_rejected_and_registers_nothing(plan, error, pattern):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    coll = rc.Collection()
    modules_before = set(sys.modules)
    good_first = (
        plan
        if not isinstance(plan, dict) or not isinstance(plan.get("entries"), list)
        else {**plan, "entries": [_good_entry(module="0", param="bias"), *plan["entries"]]}
    )
    if pattern is None:  # a scope with odd characters is only a name prefix: accepted
        rc.load_plan(model, good_first, collection=coll)
        assert {e.name for e in coll.entries()} == {"0.bias", "../0.weight"}
        return
    with pytest.raises(error, match=pattern):
        rc.load_plan(model, good_first, collection=coll)
    assert len(coll) == 0  # all or nothing
    assert set(sys.modules) == modules_before  # nothing was imported


def test_a_sum_of_equal_terms_costs_one_term():
    """TF1's sum_regularizer of equal penalties is computed as one: its p-norm parts with
    equal terms are merged (the value and gradient of the sum; the tensors kept for the
    backward of one: it kept the weight 60 times, a memory bound a loaded plan relies on)."""
    from regcollect.compat import v1

    layer = torch.nn.Linear(64, 64)
    totals, kept = [], []
    for reg in (v1.sum_regularizer([rc.l2(0.01)] * 60), rc.l2(0.6)):
        coll = rc.Collection()
        rc.add_regularizer(layer, "weight", reg, collection=coll)
        saved: list[torch.Tensor] = []

        def keep(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            totals.append(coll.loss())
        kept.append(len(saved))
    assert totals[0].item() == pytest.approx(totals[1].item(), rel=1e-6)
    assert kept[0] == kept[1] == 1
    grads = [torch.autograd.grad(t, layer.weight)[0] for t in totals]
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[1], 1.2 * layer.weight.detach())
