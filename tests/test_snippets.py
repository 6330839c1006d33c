"""Every python block of the README and the docs runs as pasted (issue 38).

The rule: a page's python blocks run in order in one fresh namespace, like the cells of a
notebook. The first block that uses ``rc`` or ``torch`` imports them, later blocks may use the
names earlier blocks of the same page defined, and every name a block uses is defined on the
page before it (data: small synthetic tensors). Each page starts with an empty default
collection and ``torch.manual_seed(0)`` (``conftest.py``), in its own working directory.

A block that cannot run here carries a marker on the line before its fence,
``<!-- not run: REASON -->``, with REASON one of ``REASONS`` (several ranks under torchrun, a
CUDA GPU, a network download, a package that cannot be installed here or a logging service's
client, named). A marked block
is still compiled, and type-checked with the rest of its page (``test_pages_type_check``).
"""

import contextlib
import io
import re
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import regcollect as rc
from regcollect import regularizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from typecheck import mypy  # noqa: E402

PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/**/*.md"))]

# Packages a block may need that this project's test environment cannot install (no build
# for the pinned CPU torch), and hosted services' clients the tests do not depend on.
NOT_INSTALLABLE = ("torchvision", "timm")
SERVICE_CLIENTS = ("wandb", "mlflow")
REASONS = (
    r"needs torchrun --nproc_per_node=\d+",
    r"needs a CUDA GPU",
    r"needs a network download",
    rf"needs (?:{'|'.join(NOT_INSTALLABLE)}), not installable here",
    rf"needs (?:{'|'.join(SERVICE_CLIENTS)}), not a test dependency",
)

FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the marker's reason


def python_blocks(page):
    """The page's python blocks in order, dedented, with the marker on the line before each."""
    text = (ROOT / page).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        line = text.count("\n", 0, m.start()) + 1
        code = textwrap.dedent(m.group(2))
        blocks.append(Block(page, line, code, marker.group(1) if marker else None))
    return blocks


def run_blocks(blocks, namespace):
    """Run the unmarked blocks in order in ``namespace``; compile the marked ones."""
    for block in blocks:
        compiled = compile(block.code, f"{block.page}:{block.line}", "exec")
        if block.not_run is None:
            try:
                exec(compiled, namespace)
            except Exception:
                pytest.fail(
                    f"{block.page}, block at line {block.line} failed as pasted:\n"
                    f"{traceback.format_exc()}",
                    pytrace=False,
                )


@pytest.fixture
def page_state(tmp_path, monkeypatch):
    """A fresh directory (files a block writes) and registry (classes a page registers)."""
    monkeypatch.chdir(tmp_path)
    registered = dict(regularizers.REGULARIZER_CLASSES)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # docs/distributed.md's group of one rank
    regularizers.REGULARIZER_CLASSES.clear()
    regularizers.REGULARIZER_CLASSES.update(registered)


# Without a GPU the mixed-precision blocks run with autocast and GradScaler disabled, as they
# would for a reader on a CPU (torch says so): names and calls are still checked.
@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_pasted(page, page_state):
    namespace = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run_blocks(python_blocks(page), namespace)
    finally:
        # A writer's thread flushes to its relative path: close it in the page's directory.
        tensorboard = sys.modules.get("torch.utils.tensorboard")
        for value in namespace.values():
            if tensorboard is not None and isinstance(value, tensorboard.SummaryWriter):
                value.close()


@pytest.mark.parametrize("page", PAGES)
def test_markers_give_an_allowed_reason(page):
    text = (ROOT / page).read_text()
    blocks = python_blocks(page)
    # Every python fence is a block the runner sees (none lost to an unmatched closing fence).
    assert len(re.findall(r"^[ \t]*```(?:python|py|pycon)\b", text, re.M)) == len(blocks)
    reasons = [b.not_run for b in blocks if b.not_run is not None]
    # A marker not on the line before a python fence marks nothing: a mistake.
    assert len(MARKER.findall(text)) == len(reasons), f"{page}: a marker not before a block"
    for reason in reasons:
        assert any(re.fullmatch(allowed, reason) for allowed in REASONS), (page, reason)


@pytest.mark.parametrize("page", PAGES)
def test_code_lines_fit_the_page(page):
    """Longer lines overflow the rendered page's code box."""
    long = [
        f"{page}:{block.line + k + 1}: {line}"
        for block in python_blocks(page)
        for k, line in enumerate(block.code.splitlines())
        if len(line) > 88
    ]
    assert not long, "\n".join(long)


def test_the_runner_fails_on_a_broken_block():
    """What the page test relies on: an unmarked block that raises fails it, a marked one is
    compiled but not run, and a marked block with a syntax error fails too."""
    blocks = [
        Block("page.md", 1, "x = 1\n", None),
        Block("page.md", 5, "raise RuntimeError('needs a GPU')\n", "needs a CUDA GPU"),
        Block("page.md", 9, "y = x + z\n", None),
    ]
    with pytest.raises(pytest.fail.Exception, match=r"(?s)line 9 failed.*NameError: name 'z'"):
        run_blocks(blocks, {})
    blocks[1].code = "raise RuntimeError(\n"
    with pytest.raises(SyntaxError):
        run_blocks(blocks, {})


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_quickstart_runs_as_pasted(page):
    code = python_blocks(page)[0].code
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
    # The table the page shows under the block is the one it prints: the same words, the
    # numbers to the digits printed. A float32 sum of 200,704 squares may differ by about
    # log2(n) * 6e-8 relative on other hardware, which can flip the last printed digit: one
    # unit of it is allowed (6 significant digits: 1e-5 relative; shares: 0.01 %).
    shown = re.search(r"```python\n.*?```\n+```\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert shown is not None, f"{page}: no output block under the first python block"
    got, want = text.split(), shown.group(1).split()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        if re.fullmatch(r"-?[\d.]+%", w):
            assert float(g[:-1]) == pytest.approx(float(w[:-1]), abs=0.01), (g, w)
        elif re.fullmatch(r"-?[\d.]+(e-?\d+)?", w):
            assert float(g) == pytest.approx(float(w), rel=1e-5), (g, w)
        else:
            assert g == w


# --strict, less what asks the snippets' own code for annotations (its functions, its empty
# lists: `decay, no_decay = [], []`); and, as in a notebook, a later block may bind a name to
# another type (training.md's `model` and `trainer`: a Lightning one, then an HF one).
MYPY_FLAGS = [
    "--strict",
    "--allow-untyped-defs",
    "--allow-untyped-calls",
    "--disable-error-code=var-annotated",
    "--allow-redefinition",
]


def as_module(blocks):
    """The blocks, each on its own lines of the page: mypy's line numbers are the page's."""
    lines = []
    for block in blocks:
        lines += [""] * (block.line - len(lines))
        lines += block.code.splitlines()
    return "\n".join(lines) + "\n"


@pytest.mark.slow  # mypy over torch's stubs (warm cache: seconds; cold: about 45 s)
def test_pages_type_check(tmp_path):
    """Each page's python blocks, marked ones too, concatenated in order into one module, pass
    mypy with ``MYPY_FLAGS`` (imports of packages not installed here are ``Any``)."""
    pytest.importorskip("mypy", reason="mypy not installed (pip install .[test])")
    modules = {}
    for page in PAGES:
        blocks = python_blocks(page)
        if blocks:
            name = "page_" + re.sub(r"\W", "_", page.removesuffix(".md"))
            modules[f"{name}.py"] = page
            (tmp_path / f"{name}.py").write_text(as_module(blocks))
    status, out = mypy(tmp_path, list(modules), *MYPY_FLAGS)
    for module, page in modules.items():
        out = out.replace(module, f"{module} ({page})")
    assert status == 0, out
