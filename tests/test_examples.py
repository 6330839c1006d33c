"""Each example runs with a tiny configuration and produces the numbers it promises."""

import importlib.util
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole scripts, 1-17 s each

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


README = (EXAMPLES.parent / "README.md").read_text()


def readme_row(script):
    """The README's examples-table row for ``script``: the figures it quotes are checked
    against what the example computes."""
    (row,) = [line for line in README.splitlines() if line.startswith(f"| `examples/{script}.py`")]
    return row


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quickstart():
    out = io.StringIO()
    with redirect_stdout(out):
        result = load("quickstart").main(steps=60, log_every=30)
    text = out.getvalue()
    assert text.count("% of loss") == 2  # printed during training and at the end
    for name in ("0.weight", "0.bias", "2.weight", "4.weight", "4:activity"):
        assert name in result and result[name] > 0
    assert result["total"] == pytest.approx(
        sum(v for k, v in result.items() if k not in ("total", "accuracy"))
    )
    assert result["accuracy"] > 0.7


def test_pretrained():
    out = io.StringIO()
    with redirect_stdout(out):
        result = load("pretrained").main(steps=3)
    assert set(result) == {
        "stem.0.weight",
        "layers.0.conv1.weight",
        "layers.0.conv2.weight",
        "layers.1.conv1.weight",
        "layers.1.conv2.weight",
        "head.weight",
        "total",
    }
    assert "regularized 6 tensors" in out.getvalue()
    assert result["total"] == pytest.approx(sum(v for k, v in result.items() if k != "total"))


def test_weight_decay_sweep(tmp_path):
    # The optimum and its neighbours, and both ends of the sweep, at the default configuration.
    out = io.StringIO()
    with redirect_stdout(out):
        rows = load("weight_decay_sweep").main(lambdas=(0.0, 0.3, 1.0, 3.0, 100.0), outdir=tmp_path)
    by_lambda = {r["lambda"]: r for r in rows}
    overfit, best, underfit = by_lambda[0.0], by_lambda[1.0], by_lambda[100.0]
    assert min(rows, key=lambda r: r["test_loss"]) is best  # an optimum in between
    assert overfit["test_loss"] > 1000 * best["test_loss"]
    assert underfit["test_loss"] > 1.5 * best["test_loss"]
    assert underfit["w_norm"] < best["w_norm"] < 0.141 < overfit["w_norm"]  # ||true w|| = 0.141
    assert overfit["penalty"] == 0.0
    # The penalty printed is rc.l2(lam / 2) of the final weight: lam/2 * ||w||^2.
    assert best["penalty"] == pytest.approx(0.5 * best["w_norm"] ** 2, rel=1e-4)
    row = readme_row("weight_decay_sweep")
    assert (
        f"λ = 0 memorises (‖w‖ ≈ {overfit['w_norm']:.0f}, test loss {overfit['test_loss']:.0f})"
        in row
    )
    assert f"λ = 1 is the optimum (test loss {best['test_loss']:.2g})" in row
    assert (
        f"λ = 100 learns almost nothing (‖w‖ ≈ {underfit['w_norm']:.2g}, "
        f"test loss {underfit['test_loss']:.2g})"
    ) in row
    png = tmp_path / "weight_decay_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "w_norm" in out.getvalue() and "test_loss" in out.getvalue()


def test_l1_vs_l2(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        results = load("l1_vs_l2").main(outdir=tmp_path)
    none, l2 = results["none"], results["L2 l2(1.5)"]
    l1, l1l2 = results["L1 l1(0.05)"], results["L1L2 l1_l2(0.02, 0.5)"]
    assert l1["near_zero"] > 0.8  # L1 makes the model sparse
    assert l1["near_zero"] > l1l2["near_zero"] > l2["near_zero"] > none["near_zero"]
    for regularized in (l1, l2, l1l2):
        assert regularized["test_loss"] < none["test_loss"]
    row = readme_row("l1_vs_l2")
    near_zero = {k: f"{v['near_zero']:.0%}" for k, v in results.items()}
    assert f"L1 makes {near_zero['L1 l1(0.05)']} of the weights near zero" in row
    assert f"L2 {near_zero['L2 l2(1.5)']}, none {near_zero['none']};" in row
    png = tmp_path / "l1_vs_l2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparsity(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        r = load("sparsity").main(outdir=tmp_path)
    assert r["proximal"]["exact_zeros"] >= 0.95  # the proximal step: exact zeros
    assert r["in the loss"]["exact_zeros"] == 0.0  # L1 in the loss: small, never 0
    for name in ("proximal", "in the loss"):
        assert r[name]["relevant_kept"] == 1.0 and r[name]["true_error"] < 0.1
    assert "exact zeros" in out.getvalue()
    zeros = {k: f"{v['exact_zeros']:.0%}" for k, v in r.items()}
    assert (
        f"{zeros['proximal']} of the irrelevant weights exactly 0, "
        f"against {zeros['in the loss']} with L1 in the loss"
    ) in readme_row("sparsity")
    assert (tmp_path / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optimizer_equivalence(dtype):
    import torch

    out = io.StringIO()
    with redirect_stdout(out):
        r = load("optimizer_equivalence").main(dtype=getattr(torch, dtype))  # 50 steps
    assert "equal to rounding" in readme_row("optimizer_equivalence")
    # Equal to rounding: within steps * 8 ulps of the weights' scale (/ (1 - momentum)),
    # a bound that falls by 2**29 from float32 to float64 with the difference itself.
    eps = torch.finfo(getattr(torch, dtype)).eps
    for name, momentum in (
        ("SGD(weight_decay) vs SGD + rc.l2(wd/2)", 0.0),
        ("SGD(momentum, weight_decay) vs SGD(momentum) + rc.l2(wd/2)", 0.9),
        ("Adam(weight_decay) vs Adam + rc.l2(wd/2)", 0.9),  # beta1
    ):
        row = r[name]
        assert row["equal to rounding"] and row["max |param difference|"] <= row["rounding bound"]
        # 50 steps of 8 ulps, / (1 - momentum): the weights' scale stays below 1 here
        assert row["rounding bound"] == pytest.approx(50 * 8 * eps / (1 - momentum))
    adamw = r["AdamW(weight_decay) vs Adam + rc.l2(wd/2)"]  # decoupled: a real difference
    assert adamw["max |param difference|"] > 1e-2 > 20 * adamw["rounding bound"]
    # weight_decay leaves the printed loss unchanged; the regcollect loss shows the penalty.
    assert r["printed weight_decay=10"] == r["printed weight_decay=10000"]
    assert r["printed regcollect=10000"] > 100 * r["printed regcollect=10"]
    assert "AdamW" in out.getvalue()


def test_finetune_l2sp(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        r = load("finetune_l2sp").main(steps=100, outdir=tmp_path)
    # L2-SP stays near the pretrained backbone; L2 pulls it towards zero, further than nothing.
    assert r["L2-SP"]["distance"] < 0.2 < r["nothing"]["distance"] < r["L2"]["distance"]
    assert r["L2-SP"]["accuracy"] > r["nothing"]["accuracy"] + 0.03
    assert r["L2-SP"]["accuracy"] > r["L2"]["accuracy"] + 0.05
    assert "target test acc" in out.getvalue()
    assert (tmp_path / "finetune_l2sp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_group_lasso(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        r = load("prune_group_lasso").main(steps=150, outdir=tmp_path)
    assert r["plain"]["zero_filters"] == 0
    lasso = r["group lasso"]
    assert lasso["zero_filters"] >= 16  # of 32: whole filters exactly zero
    assert lasso["pruned_parameters"] < lasso["parameters"] / 4
    # Removing exactly-zero filters changes nothing: same accuracy, outputs to rounding.
    assert lasso["pruned_accuracy"] == lasso["accuracy"]
    assert lasso["max_output_change"] < 1e-4
    assert lasso["accuracy"] >= r["plain"]["accuracy"] - 0.05
    assert (tmp_path / "prune_group_lasso.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TQDM_EXAMPLES = ["finetune_l2sp", "l1_vs_l2", "prune_group_lasso", "sparsity", "weight_decay_sweep"]


@pytest.mark.parametrize("name", TQDM_EXAMPLES)
def test_an_example_without_its_extra_names_it(name, monkeypatch):
    """Without tqdm the example stops at once, naming the extra that installs it; its first
    lines say so too."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # what an install without the extra gives
    with pytest.raises(SystemExit, match=r'needs tqdm: pip install -e "\.\[examples\]"'):
        load(name)
    assert 'pip install -e ".[examples]"' in (EXAMPLES / f"{name}.py").read_text()[:300]
