"""Interleaved timing shared by the benchmark scripts beside this file (imported as
``from timing import measure``, as ``memory.py`` is)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    inner: int,
    device: torch.device = CPU,
) -> dict[str, float]:
    """Median seconds per call of each candidate, repetitions interleaved between them."""
    for fn in candidates.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}
