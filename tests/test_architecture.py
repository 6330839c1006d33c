"""The package's structure, counted from its source by ``tests/architecture.py`` (AST only,
no import): the numbers issue 36 set, and the picture ``docs/architecture.md`` shows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import architecture

RESULT = architecture.scan()


def test_no_private_name_is_reached_across_packages():
    assert RESULT["private_reaches"] == []


def test_no_import_cycle_between_modules_or_packages():
    assert RESULT["cycles"] == [] and RESULT["package_cycles"] == []


def test_no_sys_modules_write_and_no_heap_scan():
    assert RESULT["sys_modules_writes"] == [] and RESULT["gc_scans"] == []


def test_functions_and_modules_stay_short():
    assert RESULT["long_functions"] == []
    assert RESULT["long_modules"] == []


def test_the_architecture_page_shows_the_real_import_graph():
    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    shown = re.search(r"```text\n(.*?)\n```", page, re.S)
    assert shown is not None
    assert shown.group(1) == architecture.picture(RESULT["graph"])  # type: ignore[arg-type]
