"""The documentation site builds in strict mode and shows no raw markup: every formula is
MathML (no script, no network) and docstrings carry no Sphinx roles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="pip install .[test] installs the docs tools")
    pytest.importorskip("latex2mathml", reason="pip install .[test] installs the docs tools")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.html")}


RAW = [
    (re.compile(r":(?:meth|class|func|mod|attr|data|exc):`"), "a Sphinx role"),
    (re.compile(r"\\\(|\\\)|\\\[|\\\]"), "raw TeX delimiters"),
    (re.compile(r'class="arithmatex"'), "an unconverted formula"),
    (re.compile(r"\\(?:lambda|sum|frac|lvert|odot)"), "a raw TeX command"),
]


def test_no_page_shows_raw_roles_or_tex(site):
    found = [
        f"{page}: {what}: ...{html[max(0, m.start() - 40) : m.end() + 40]!r}..."
        for page, html in site.items()
        if not page.startswith("search/")
        for pattern, what in RAW
        for m in [pattern.search(html)]
        if m
    ]
    assert not found, "\n".join(found)


def test_formulas_are_mathml_and_the_api_lists_what_users_import(site):
    assert site["regularizers/index.html"].count("<math") >= 5
    api = site["api/index.html"]
    for name in ("regcollect.loss", "regcollect.attach_optimizer", "regcollect.regularize"):
        assert f'id="{name}"' in api, name


def test_install_commands_work_on_a_fresh_machine():
    """regcollect is not on PyPI and an unpinned torch is a multi-GB CUDA download: every
    ``pip install`` in the README, the docs and the messages installs from the checkout (or a
    wheel built from it) and pins torch where it installs it."""
    sources = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "regcollect").rglob("*.py"),
    ]
    bad = []
    for path in sources:
        for line in path.read_text().splitlines():
            for command in re.findall(r"pip install[^`;&|,(#\n]*", line):
                words = command.replace('"', " ").replace("'", " ").split()
                if any(re.fullmatch(r"regcollect(\[.*\])?", w) for w in words) or (
                    "torch" in words and "torch==2.13.0" not in words
                ):
                    bad.append(f"{path.relative_to(ROOT)}: {command.strip()}")
    assert not bad, "\n".join(bad)
