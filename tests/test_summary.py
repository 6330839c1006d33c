import io

import pytest
import torch

import regcollect as rc


def build():
    model = torch.nn.Sequential(
        rc.nn.Linear(3, 2, kernel_regularizer=rc.l2(1.0), bias_regularizer=rc.l1(1.0))
    )
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # 6 * 1 = 6
        model[0].bias.fill_(-2.0)  # 2 * 2 = 4
    return model


def test_summary_contents():
    _model = build()
    rc.loss()
    out = io.StringIO()
    text = rc.summary(loss=torch.tensor(20.0), file=out)
    assert out.getvalue() == text + "\n"
    lines = text.splitlines()
    assert lines[0].split() == [
        "name",
        "shape",
        "regularizer",
        "penalty",
        "%",
        "of",
        "reg.",
        "%",
        "of",
        "loss",
    ]
    weight = next(line for line in lines if line.startswith("0.weight"))
    assert weight.split() == ["0.weight", "2x3", "L2(l2=1.0)", "6", "60.00%", "30.00%"]
    bias = next(line for line in lines if line.startswith("0.bias"))
    assert bias.split() == ["0.bias", "2", "L1(l1=1.0)", "4", "40.00%", "20.00%"]
    total = next(line for line in lines if line.startswith("total "))
    assert total.split() == ["total", "10", "100.00%", "50.00%"]
    assert "total loss: 20" in text


def test_summary_reads_last_loss_values_only():
    model = build()
    text = rc.summary(file=io.StringIO())
    row = next(line for line in text.splitlines() if line.startswith("0.weight"))
    # registered, not computed yet
    assert row.split() == ["0.weight", "2x3", "L2(l2=1.0)", "-", "-"]
    rc.loss()
    with torch.no_grad():
        model[0].weight.fill_(2.0)  # not seen until the next loss()
    assert rc.penalties() == pytest.approx({"0.weight": 6.0, "0.bias": 4.0, "total": 10.0})
    rc.loss()
    assert rc.penalties()["0.weight"] == pytest.approx(24.0)


def test_summary_one_device_to_host_copy(monkeypatch, device):
    model = build().to(device)
    layer = rc.nn.Linear(
        2, 2, kernel_regularizer=rc.orthogonal(), activity_regularizer="l2", device=device
    )
    layer(torch.randn(3, 2, device=device))
    rc.loss([model, layer])
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in summary"))
    text = rc.summary(
        loss=torch.tensor(3.0, device=device), scope=[model, layer], file=io.StringIO()
    )
    assert len(calls) == 1
    assert text.splitlines()[-1].split()[-1] == "3"  # the total loss line


def test_summary_scope_tablefmt_and_errors():
    model = build()  # noqa: F841 (kept alive: entries hold modules weakly)
    rc.loss()
    text = rc.summary(scope=r"0\.b", tablefmt="github", file=io.StringIO())
    assert "0.bias" in text and "0.weight" not in text and text.startswith("| name")
    with pytest.raises(ValueError, match="tablefmt must be one of .* got 'fancy'"):
        rc.summary(tablefmt="fancy", file=io.StringIO())
    with pytest.raises(ValueError, match=r"loss must be a scalar"):
        rc.summary(loss=torch.ones(2), file=io.StringIO())
    with pytest.raises(TypeError, match="loss must be a scalar tensor, a number or None"):
        rc.summary(loss="1.0", file=io.StringIO())
    assert "50.00%" in rc.summary(loss=20.0, file=io.StringIO())


def test_penalties_with_activity_and_collections():
    coll = rc.Collection()
    layer = rc.nn.Linear(2, 2, bias=False, activity_regularizer=rc.l1(1.0), collection=coll)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    layer(torch.ones(2, 2))
    layer(2 * torch.ones(2, 2))  # the latest pass: sum |out| / batch = 8 / 2
    coll.loss()
    values = coll.penalties()
    name = coll.entries()[0].name
    assert values == {name: pytest.approx(4.0), "total": pytest.approx(4.0)}
    assert rc.penalties(collection=coll) == values
    assert rc.penalties() == {"total": 0.0}
    assert "100.00%" in coll.summary(file=io.StringIO())


def test_summary_marks_non_finite():
    layer = rc.nn.Linear(2, 2, kernel_regularizer="l2")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert torch.isnan(rc.loss())
    assert "nan (!)" in rc.summary(file=io.StringIO())
