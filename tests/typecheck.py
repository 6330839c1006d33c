"""mypy run as a user runs it on their own code: on ``files`` in ``cwd`` (outside the project),
with the project's config and its cache (warm once ``.ci/run``'s mypy step or an earlier run
filled it); the files given replace the configured packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mypy(cwd: Path, files: list[str], *flags: str) -> tuple[int, str]:
    """mypy's exit status and its whole output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            *flags,
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *files,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout + result.stderr
