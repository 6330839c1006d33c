"""Seeing the penalties: rows from ``regcollect._readout`` rendered as a table.

Renders what the last ``loss()`` computed (one device-to-host copy for the whole table) and
never computes a penalty itself.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any

import torch
from tabulate import tabulate, tabulate_formats

from .entries import ACTIVITY, Entry
from .readout import Row

__all__ = ["SummaryText", "render", "table_extra"]

HEADERS = ["name", "shape", "regularizer", "penalty", "% of reg.", "% of loss"]


class SummaryText(str):
    """The table as a ``str``; its repr is one line, so that at the Python prompt the table
    printed by ``summary()`` is not shown a second time as the return value."""

    def __repr__(self) -> str:
        rows = max(0, self.count("\n") - 1)
        return f"<regcollect summary: {rows} rows; print() it to see the table>"


def _percent(part: float | None, whole: float | None) -> str:
    if part is None:
        return "-"
    if whole is None:
        return ""
    if whole == 0:
        return "-" if part == 0 else "inf"
    return f"{100.0 * part / whole:.2f}%"


def _value(value: float | None) -> str:
    # Formatted here: tabulate would switch the whole column to full precision as soon as
    # one cell is not a number.
    if value is None:
        return "-"  # registered after the last loss() call, or frozen
    if not math.isfinite(value):
        return f"{value} (!)"
    return f"{value:.6g}"


def table_extra(loss: torch.Tensor | float | None) -> tuple[list[torch.Tensor], float | None]:
    """Check the ``loss`` argument: ``([loss tensor], None)``, ``([], float)`` or ``([], None)``."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return [loss], None
    if loss is None:
        return [], None
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(
            f"loss must be a scalar tensor, a number or None, got {type(loss).__name__}"
        )
    return [], float(loss)


def check_tablefmt(tablefmt: object) -> str:
    if not isinstance(tablefmt, str) or tablefmt not in tabulate_formats:
        raise ValueError(
            f"tablefmt must be one of tabulate's formats ({', '.join(sorted(tabulate_formats))}), "
            f"got {tablefmt!r}"
        )
    return tablefmt


def _no_shape(entry: Entry) -> str:
    return "output" if entry.kind == ACTIVITY else "-"  # a weight whose tensor is gone


def render(
    rows: list[Row],
    total: float,
    loss_value: float | None,
    *,
    tablefmt: str = "simple",
    file: IO[str] | None = None,
) -> str:
    """Build, print (to ``file``, default stdout) and return the summary table of ``rows``."""
    headers = HEADERS if loss_value is not None else HEADERS[:-1]
    table: list[list[Any]] = []
    for entry, name, value in rows:
        shape = entry.shape
        row = [
            name,
            "x".join(map(str, shape)) if shape is not None else _no_shape(entry),
            repr(entry.regularizer),
            _value(value),
            _percent(value, total),
        ]
        if loss_value is not None:
            row.append(_percent(value, loss_value))
        table.append(row)
    total_row: list[Any] = ["total", "", "", _value(total), _percent(total, total) if rows else ""]
    if loss_value is not None:
        total_row.append(_percent(total, loss_value))
    table.append(total_row)
    align = ("left", "left", "left", "right", "right", "right")[: len(headers)]
    text = tabulate(
        table, headers=headers, tablefmt=tablefmt, disable_numparse=True, colalign=align
    )
    if loss_value is not None:
        text += f"\ntotal loss: {loss_value:.6g}"
    print(text, file=file if file is not None else sys.stdout)
    return SummaryText(text)
