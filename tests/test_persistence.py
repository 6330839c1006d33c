import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import regcollect as rc


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
    assert rc.loss(clone).item() == pytest.approx(weights_penalty(clone).item(), rel=1e-5)
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
