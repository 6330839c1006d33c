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
    assert text.splitlines()[-1].startswith("total loss: 3")  # the total loss line


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


# -- the Summary object: notebooks, Markdown, views (issue 38) --


class FakeShell:
    """Stands in for IPython's shell: what ``display`` was given, cell by cell."""

    def __init__(self):
        self.execution_count = 1
        self.shown = []


@pytest.fixture
def ipython(monkeypatch):
    """A fake ``IPython`` package in ``sys.modules``: ``get_ipython()`` and ``display``,
    the two things a kernel offers that the summary uses."""
    import sys
    import types

    shell = FakeShell()
    package = types.ModuleType("IPython")
    package.get_ipython = lambda: shell
    display_module = types.ModuleType("IPython.display")

    def display(obj, raw=False):
        assert raw, "the summary hands over its own mime bundle"
        shell.shown.append(obj)

    display_module.display = display
    package.display = display_module
    monkeypatch.setitem(sys.modules, "IPython", package)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    return shell


def displayhook(shell, value):
    """What IPython's display hook does with a cell's last value: ``_ipython_display_``
    first (when defined it replaces every other representation)."""
    method = getattr(value, "_ipython_display_", None)
    if method is not None:
        method()
    else:
        shell.shown.append({"text/plain": repr(value)})


def test_summary_in_a_notebook_is_one_html_table(ipython, capsys):
    _model = build()
    rc.loss()
    result = rc.summary(loss=20.0)  # the cell's last expression
    displayhook(ipython, result)
    assert capsys.readouterr().out == ""  # not printed: displayed
    (bundle,) = ipython.shown  # once, not again as the cell's value
    assert bundle["text/plain"] == str(result)
    html = bundle["text/html"]
    assert html == result._repr_html_()
    assert "<table>" in html and "<td>0.weight</td>" in html and "60.00%" in html
    assert "total loss: 20" in html
    ipython.execution_count += 1  # a later cell showing the kept value shows it again
    displayhook(ipython, result)
    assert len(ipython.shown) == 2


def test_summary_in_a_notebook_loop_shows_every_table(ipython):
    _model = build()
    for _ in range(3):
        rc.loss()
        rc.summary()  # not the cell's value: shown by the call itself
    assert len(ipython.shown) == 3


def test_summary_markdown_where_asked(ipython):
    _model = build()
    rc.loss()
    result = rc.summary(tablefmt="github")
    (bundle,) = ipython.shown
    assert bundle["text/markdown"] == str(result) and "text/html" not in bundle
    assert str(result).startswith("| name")
    markdown = build_and_summarise(tablefmt="simple")._repr_markdown_()
    lines = markdown.splitlines()
    assert lines[0].startswith("| name") and lines[1].startswith("|:")
    assert any(line.startswith("| 0.weight") for line in lines)


def build_and_summarise(**kwargs):
    build()
    rc.loss()
    return rc.summary(file=io.StringIO(), **kwargs)


def test_summary_html_format_is_html_in_a_notebook(ipython):
    result = build_and_summarise(tablefmt="html")
    assert str(result).startswith("<table>")
    assert result._repr_html_() == str(result)


def test_summary_html_escapes_names():
    with rc.scope("<b>"):
        _layer = rc.nn.Linear(2, 2, kernel_regularizer="l2")
    rc.loss()
    html = rc.summary(file=io.StringIO())._repr_html_()
    assert "<td>&lt;b&gt;/linear" in html and "<b>" not in html


def test_summary_is_a_str_printed_once_by_the_call(capsys):
    _model = build()
    rc.loss()
    result = rc.summary()
    printed = capsys.readouterr().out
    assert isinstance(result, str) and printed == result + "\n"
    assert "\n" not in repr(result) and repr(result).startswith("<regcollect summary")


def many_layers():
    """Four layers with penalties 1, 4, 9 and 16 (an L2(1) on a 1x1 weight of value k)."""
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)),
        torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)),
    )
    for k, layer in enumerate([model[0][0], model[0][1], model[1][0], model[1][1]], start=1):
        with torch.no_grad():
            layer.weight.fill_(float(k))
            layer.bias.fill_(0.0)
    rc.regularize(model, kernel=rc.l2(1.0), bias=rc.l1(1.0))
    rc.loss()
    return model


def rows_of(text):
    lines = text.splitlines()[2:]
    return {line.split()[0]: line.split() for line in lines if not line.startswith("total loss")}


def test_summary_top_k_keeps_the_largest_and_sums_the_others():
    _model = many_layers()
    text = rc.summary(top=2, loss=60.0, file=io.StringIO())
    rows = rows_of(text)
    names = [line.split()[0] for line in text.splitlines()[2:]]
    # largest first, then what the other 6 entries (2 weights, 4 zero biases) add up to
    assert names[:3] == ["1.1.weight", "1.0.weight", "others"]
    assert rows["1.1.weight"][3:] == ["16", "53.33%", "26.67%"]
    assert rows["others"][1:] == ["(6)", "5", "16.67%", "8.33%"]
    assert rows["total"][1:] == ["30", "100.00%", "50.00%"]
    assert rc.summary(top=8, file=io.StringIO()) == rc.summary(top=100, file=io.StringIO())
    assert "others" not in rc.summary(top=8, file=io.StringIO())
    with pytest.raises(ValueError, match="top must be a positive integer or None, got 0"):
        rc.summary(top=0, file=io.StringIO())


def test_summary_by_module_adds_up_each_module():
    _model = many_layers()
    rows = rows_of(rc.summary(by="module", file=io.StringIO()))
    assert set(rows) == {"0.0", "0.1", "1.0", "1.1", "total"}
    # weight k*k plus a zero bias: 2 entries, both regularizers named once
    assert rows["1.0"] == ["1.0", "2", "L2(l2=1.0),", "L1(l1=1.0)", "9", "30.00%"]
    rows = rows_of(rc.summary(by="module", depth=1, file=io.StringIO()))
    assert rows["0"][1] == "4" and rows["0"][-2:] == ["5", "16.67%"]
    assert rows["1"][-2:] == ["25", "83.33%"] and rows["total"][-2:] == ["30", "100.00%"]
    activity = rc.nn.Linear(1, 1, bias=False, activity_regularizer=rc.l1(1.0))
    with torch.no_grad():
        activity.weight.fill_(1.0)
    activity(torch.ones(1, 1))
    rc.loss(activity)
    rows = rows_of(rc.summary(scope=activity, by="module", file=io.StringIO()))
    assert rows[activity_name(activity)][-2:] == ["1", "100.00%"]


def test_penalties_by_module_and_total_are_the_summarys_views_as_numbers():
    """What loggers get: the module sums summary(by="module") shows, or the total alone."""
    _model = many_layers()  # layer k: weight k*k (l2), zero bias (l1)
    assert rc.penalties(by="module") == {
        "0.0": 1.0,
        "0.1": 4.0,
        "1.0": 9.0,
        "1.1": 16.0,
        "total": 30.0,
    }
    assert rc.penalties(by="module", depth=1) == {"0": 5.0, "1": 25.0, "total": 30.0}
    assert rc.penalties(by="total") == {"total": 30.0}
    with pytest.raises(ValueError, match="by must be one of 'entry', 'module', 'total'"):
        rc.penalties(by="layer")


def activity_name(layer):
    (entry,) = rc.get_collection().entries(layer)
    return entry.name.split(":")[0]


def test_summary_total_only():
    _model = many_layers()
    text = rc.summary(by="total", loss=60.0, file=io.StringIO())
    assert text.splitlines()[0].split() == ["name", "penalty", "%", "of", "loss"]
    assert text.splitlines()[2].split() == ["total", "30", "50.00%"]
    assert len(text.splitlines()) == 4  # header, rule, total, total loss
    with pytest.raises(ValueError, match="by must be one of 'entry', 'module', 'total'"):
        rc.summary(by="layer", file=io.StringIO())
    with pytest.raises(ValueError, match="depth must be a positive integer or None"):
        rc.summary(by="module", depth=0, file=io.StringIO())


def test_summary_regularizer_column_is_compact_with_schedules():
    sched = rc.schedules.warmup(0.01, steps=4)
    sched.set_step(3)
    layer = rc.nn.Linear(
        3,
        2,
        kernel_regularizer=rc.l2(sched),
        bias_regularizer=rc.l1_l2(l1=rc.schedules.cosine(1e-3, 0.0, steps=1000), l2=1e-4),
    )
    rc.loss()
    rows = rows_of(rc.summary(file=io.StringIO()))
    name = rc.get_collection().entries(layer)[0].name.rsplit(".", 1)[0]
    weight = " ".join(rows[f"{name}.weight"][2:-2])
    bias = " ".join(rows[f"{name}.bias"][2:-2])
    assert weight == "L2(l2=0.0075 linear@3)"
    assert bias == "L1L2(l1=0.001 cosine@0, l2=0.0001)"


def test_a_scheduled_row_shows_the_coefficient_its_penalty_was_computed_with():
    """The documented order (loss, backward, step, then the summary): the step has moved the
    schedule on, but the row's penalty is the last loss()'s, so its coefficient is too."""
    model = torch.nn.Sequential(
        rc.nn.Linear(2, 1, bias=False, kernel_regularizer=rc.l2(rc.schedules.warmup(1e-4, 4)))
    )
    torch.nn.init.constant_(model[0].weight, 10.0)  # sum(w**2) = 200
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(3):
        total = model(torch.ones(1, 2)).sum() + rc.loss()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        row = rows_of(rc.summary(file=io.StringIO()))["0.weight"]
        coefficient = 1e-4 * step / 4  # warmup: 0, 2.5e-5, 5e-5 at the steps 0, 1, 2
        assert float(row[-2]) == pytest.approx(200 * coefficient, abs=1e-12)
        assert " ".join(row[2:-2]) == f"L2(l2={coefficient:.4g} linear@{step})"


def test_summary_in_a_real_notebook_shows_one_table(tmp_path):
    """Executed by a real Jupyter kernel (skipped where nbclient/ipykernel are missing)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    setup = (
        "import torch, regcollect as rc\n"
        "model = torch.nn.Sequential(rc.nn.Linear(4, 3, kernel_regularizer=rc.l2(0.01)))\n"
        "_ = rc.loss()"
    )
    cells = [setup, "rc.summary(loss=3.0)", "s = rc.summary(tablefmt='github')", "s"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=120, resources={"metadata": {"path": "."}}).execute()
    outputs = [cell.outputs for cell in notebook.cells]
    assert outputs[0] == []
    (shown,) = outputs[1]  # displayed by the call, not again as the cell's value
    assert shown["output_type"] == "display_data" and "<table>" in shown["data"]["text/html"]
    assert [sorted(o["data"]) for o in outputs[2] + outputs[3]] == [
        ["text/markdown", "text/plain"],
        ["text/markdown", "text/plain"],
    ]


def test_two_models_sharing_a_schedule_show_the_step_each_row_was_computed_at():
    """GAN order: loss(G), G's step, loss(D), D's step. One schedule on both: G's row was
    computed a step before D's, and each row shows its own step."""
    warmup = rc.l2(rc.schedules.warmup(1.0, 8))
    G = torch.nn.Sequential(rc.nn.Linear(1, 1, bias=False, kernel_regularizer=warmup))
    D = torch.nn.Sequential(rc.nn.Linear(1, 1, bias=False, kernel_regularizer=warmup))
    for model in (G, D):
        torch.nn.init.constant_(model[0].weight, 1.0)
    opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=0.0) for m in (G, D))
    for _ in range(2):
        for model, opt in ((G, opt_g), (D, opt_d)):
            rc.loss(model).backward()
            opt.step()
    # G's last loss() ran a step of the shared schedule before D's: sum(w**2) = 1, so each
    # row's penalty is the coefficient it was computed with, and the rows differ.
    rows = rows_of(rc.summary(file=io.StringIO()))
    shown = [(" ".join(r[2:-2]), float(r[-2])) for r in rows.values() if r[0] != "total"]
    assert shown == [("L2(l2=0.125 linear@1)", 0.125), ("L2(l2=0.25 linear@2)", 0.25)]


def test_a_loss_that_cannot_be_the_total_is_pointed_out():
    """``loss=`` is the total training loss; one smaller than the penalties it includes is
    most likely the data loss alone, and a share of a loss that is not positive means nothing."""
    model = torch.nn.Sequential(rc.nn.Linear(2, 1, bias=False, kernel_regularizer=rc.l2(1.0)))
    torch.nn.init.constant_(model[0].weight, 1.0)  # penalty 2
    rc.loss()
    text = rc.summary(loss=0.5, file=io.StringIO())
    assert rows_of(text)["0.weight"][-1] == "400.00%"
    assert text.splitlines()[-1] == (
        "total loss: 0.5, smaller than the penalties shown (2): pass the total loss "
        "(data loss + rc.loss()), and scope= the model it is the loss of"
    )
    for loss in (0.0, -3.0):
        text = rc.summary(loss=loss, file=io.StringIO())
        assert rows_of(text)["0.weight"][-1] == "-"
        assert text.splitlines()[-1] == f"total loss: {loss:g}"
    assert rc.summary(loss=2.5, file=io.StringIO()).splitlines()[-1] == "total loss: 2.5"
