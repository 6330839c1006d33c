"""Reading back what ``loss()`` computed: rows of values, ``penalties()``, ``assert_finite``.

Each ``loss()`` leaves detached values on the device (``Last``); nothing is read back to
the host until someone asks, and then with one device-to-host copy per device. Several views
(``loss(G)`` and ``loss(D)`` in a GAN, one model per thread) each keep their own last values;
a row shows the most recent value any view computed for its entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _locks
from .._torch_compat import is_compiling
from .entries import Entry

__all__ = [
    "Last",
    "Readout",
    "Row",
    "as_dict",
    "check_finite",
    "steps_of",
    "to_host",
    "with_total",
]

Row = tuple[Entry, str, "float | None"]


@dataclass
class Last:
    """What one ``loss()`` computed, kept on the device until a summary asks."""

    entries: list[Entry]
    # (values, indices into entries): detached 1-D tensors from the engine.
    parts: list[tuple[torch.Tensor, list[int]]]
    # Detached activity penalties, and the activity entries the call covered.
    records: list[tuple[Entry, torch.Tensor]]
    activity: list[Entry] = field(default_factory=list)
    # {id(schedule): step} of the coefficients when it was computed (None: not known, as in
    # a compiled step), so a summary shows the coefficient each value was computed with.
    steps: dict[int, int] | None = None

    def __post_init__(self) -> None:
        # Holding a differentiable value would keep the step's autograd graph (and the
        # activations it saved) alive until the next loss().
        self.records = [(e, v.detach()) for e, v in self.records]


class Readout:
    """The last values of each view (scope) of one collection; at most ``size`` views.

    Views are kept in the order they were last computed (a store moves its view to the end):
    where views overlap, the latest one's values win.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = _locks.Lock()
        self._lasts: dict[Any, Last] = {}
        # The latest view a compiled step stored, folded into _lasts by the next eager call.
        self._traced: tuple[Any, Last] | None = None

    def store(self, key: Any, last: Last) -> None:
        if is_compiling():
            # Traced: one attribute set, no lock (dynamo cannot enter one; a compiled step
            # runs on one thread at a time) and nothing read from the dict, whose contents
            # dynamo would otherwise guard on (a recompile once the key is in it).
            self._traced = (key, last)
            return
        with self._lock:
            self._fold()
            self._put(key, last)

    def _fold(self) -> None:
        if self._traced is not None:
            (key, last), self._traced = self._traced, None
            self._put(key, last)

    def _put(self, key: Any, last: Last) -> None:
        self._lasts.pop(key, None)
        if len(self._lasts) >= self.size:
            del self._lasts[next(iter(self._lasts))]
        self._lasts[key] = last

    def clear(self) -> None:
        with self._lock:
            self._lasts, self._traced = {}, None

    def lasts(self) -> list[Last]:
        """The views' last values, oldest first (a compiled step's folded in): one snapshot,
        for ``rows`` and ``steps_of`` to read together."""
        with self._lock:
            self._fold()
            return list(self._lasts.values())

    def rows(
        self,
        entries: Sequence[Entry],
        names: dict[Entry, str],
        extra: Sequence[torch.Tensor] = (),
        lasts: Sequence[Last] | None = None,
    ) -> tuple[list[Row], float, list[float]]:
        """Rows ``(entry, name, value or None)``, their total, and ``extra`` tensors as floats,
        from ``lasts`` (default: the current ``lasts()``).

        None marks an entry no ``loss()`` has evaluated (registered since, or frozen).
        """
        lasts = self.lasts() if lasts is None else lasts
        tensors: list[torch.Tensor] = [t.detach().reshape(-1) for t in extra]
        owners: list[tuple[int, list[Entry]]] = []
        for n, last in enumerate(lasts):
            for values, indices in last.parts:
                tensors.append(values.reshape(-1))
                owners.append((n, [last.entries[i] for i in indices]))
            for entry, value in last.records:
                tensors.append(value.reshape(-1))
                owners.append((n, [entry]))
        floats = to_host(tensors)
        per_last: list[dict[Entry, float]] = [
            dict.fromkeys([*last.entries, *last.activity], 0.0) for last in lasts
        ]
        for (n, owner), flat in zip(owners, floats[len(extra) :]):
            for entry, v in zip(owner, flat):
                per_last[n][entry] = per_last[n].get(entry, 0.0) + v
        value_of: dict[Entry, float] = {}
        for computed in per_last:  # oldest first: the latest view's value wins
            value_of.update(computed)
        rows = [(e, names[e], value_of.get(e)) for e in entries]
        total = sum(v for _, _, v in rows if v is not None)
        return rows, total, [f[0] for f in floats[: len(extra)]]


def steps_of(lasts: Sequence[Last]) -> dict[Entry, dict[int, int]]:
    """Each entry's schedules' steps when its value in ``rows`` was computed: those of the
    latest view to cover it; left out where that view was a compiled step's, whose steps are
    not known."""
    steps: dict[Entry, dict[int, int]] = {}
    for last in lasts:  # oldest first, as in rows(): the latest view wins
        for entry in [*last.entries, *last.activity]:
            if last.steps is None:
                steps.pop(entry, None)
            else:
                steps[entry] = last.steps
    return steps


def check_finite(rows: Sequence[Row]) -> None:
    """Raise ``FloatingPointError`` naming every row whose value is NaN or infinite."""
    bad = [
        (name, value) for _, name, value in rows if value is not None and not math.isfinite(value)
    ]
    if bad:
        listed = ", ".join(f"{name!r} ({value})" for name, value in bad)
        raise FloatingPointError(
            f"non-finite regularization penalty in {len(bad)} entr"
            f"{'y' if len(bad) == 1 else 'ies'}: {listed}; the weights (or, for activity "
            "entries, the layer outputs) hold NaN or inf values"
        )


def as_dict(rows: Sequence[Row], total: float) -> dict[str, float]:
    """``{name: value, ..., "total": total}`` for loggers; rows without a value left out.
    An entry named ``total`` (a root-level parameter) keeps its name; the sum is then
    ``"total (sum)"``."""
    return with_total({name: value for _, name, value in rows if value is not None}, total)


def with_total(values: dict[str, float], total: float) -> dict[str, float]:
    """``values`` with the sum under ``"total"``, or ``"total (sum)"`` when a row is named
    ``total``."""
    values["total (sum)" if "total" in values else "total"] = total
    return values


def to_host(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """Each tensor as a list of floats, with one device-to-host copy per device."""
    out: list[list[float]] = [[] for _ in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].to(torch.float64) for i in indices]).tolist()
        pos = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[pos : pos + n]
            pos += n
    return out
