"""Each example runs with a tiny configuration and produces the numbers it promises."""

import importlib.util
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
