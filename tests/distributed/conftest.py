"""The torchrun launcher the distributed tests share (2 gloo ranks unless told)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The torchrun scripts the tests launch are not test modules: importing them for doctest
# collection would start nothing and needs FSDP2's (or DeepSpeed's) imports.
collect_ignore = ["worker.py", "deepspeed_worker.py", "tp_worker.py"]


@pytest.fixture(scope="module")
def torchrun() -> Any:
    """``torchrun(script, *args, timeout=..., env=None, nproc=2)`` on ``nproc`` gloo ranks."""
    return _torchrun


def _torchrun(
    script: Path,
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
    nproc: int = 2,
) -> tuple[int | None, str, str]:
    """Run ``script`` on ``nproc`` gloo ranks; ``(returncode or None on timeout, stdout,
    stderr)``.

    The launcher and its ranks get a session of their own, so a timeout kills them all.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        [*cmd, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        # The elastic agent may start its ranks in process groups of their own: collect the
        # whole tree before killing, or an orphaned rank keeps the pipes open forever.
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(output lost: a process kept the pipes open)"
        return None, stdout, stderr


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), found before any of them is killed."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found
