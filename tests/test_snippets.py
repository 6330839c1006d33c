"""The quickstarts run as pasted (issue 38): the first code block of the README and of the
docs' home page, executed as a new user would paste them into a fresh interpreter."""

import contextlib
import io
import re
from pathlib import Path

import pytest

import regcollect as rc

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_quickstart_runs_as_pasted(page):
    code = python_blocks(ROOT / page)[0]
    namespace = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{page} (first python block)", "exec"), namespace)
    model = namespace["model"]
    text = printed.getvalue()
    assert text.startswith("name ") and "2:activity" in text and "total loss:" in text
    values = rc.penalties()
    # The weights' rows are the formulas on the weights as the last loss() saw them: in the
    # README no step ran after it; on the home page the loop's last step did.
    if page == "README.md":
        w0, b0, w2 = model[0].weight, model[0].bias, model[2].weight
        expected = {
            "0.weight": 1e-4 * w0.pow(2).sum(),
            "0.bias": 0.01 * b0.abs().sum(),
            "2.weight": 1e-5 * w2.abs().sum() + 1e-4 * w2.pow(2).sum(),
        }
        for name, value in expected.items():
            assert values[name] == pytest.approx(value.item(), rel=1e-5)
    assert values["total"] == pytest.approx(sum(v for k, v in values.items() if k != "total"))
