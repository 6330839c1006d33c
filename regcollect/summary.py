"""Seeing the penalties: a table for humans, a dict for loggers.

Reads the values the last ``loss()`` computed (one device-to-host copy for the whole table) and
never computes a penalty itself.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any

import torch
from tabulate import tabulate, tabulate_formats

from .collection import Collection, active_collection

__all__ = ["summary", "render"]

HEADERS = ["name", "shape", "regularizer", "penalty", "% of reg.", "% of loss"]


def _percent(part: float | None, whole: float | None) -> str:
    if part is None or whole is None:
        return ""
    if whole == 0:
        return "-" if part == 0 else "inf"
    return f"{100.0 * part / whole:.2f}%"


def _value(value: float | None) -> str | float:
    if value is None:
        return "-"  # registered after the last loss() call, or frozen
    if not math.isfinite(value):
        return f"{value} (!)"
    return value


def render(
    collection: Collection,
    loss: torch.Tensor | float | None = None,
    scope: str | None = None,
    *,
    tablefmt: str = "simple",
    file: IO[str] | None = None,
) -> str:
    """Build, print and return the summary table of ``collection``."""
    if not isinstance(tablefmt, str) or tablefmt not in tabulate_formats:
        raise ValueError(
            f"tablefmt must be one of tabulate's formats ({', '.join(sorted(tabulate_formats))}), "
            f"got {tablefmt!r}"
        )
    extra: list[torch.Tensor] = []
    loss_value: float | None = None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        extra.append(loss)
    elif loss is not None:
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(
                f"loss must be a scalar tensor, a number or None, got {type(loss).__name__}"
            )
        loss_value = float(loss)
    rows, total, extra_values = collection._snapshot(scope, extra)
    if extra_values:
        loss_value = extra_values[0]
    headers = HEADERS if loss_value is not None else HEADERS[:-1]
    table: list[list[Any]] = []
    for entry, name, value in rows:
        shape = entry.shape
        row = [
            name,
            "x".join(map(str, shape)) if shape is not None else "output",
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
    text = tabulate(table, headers=headers, tablefmt=tablefmt, floatfmt=".6g")
    if loss_value is not None:
        text += f"\ntotal loss: {loss_value:.6g}"
    print(text, file=file if file is not None else sys.stdout)
    return text


def summary(
    loss: torch.Tensor | float | None = None,
    scope: str | None = None,
    *,
    tablefmt: str = "simple",
    file: IO[str] | None = None,
    collection: Collection | None = None,
) -> str:
    """Print (to ``file``, default stdout) and return a table of each penalty's contribution.

    One row per entry: name, shape, regularizer, penalty, share of the regularization total and,
    when ``loss`` (the total training loss) is given, share of it; then a total row. Values are
    those of the last ``loss()`` call, fetched with one device-to-host copy; ``-`` marks entries
    that call did not evaluate (registered since, or frozen).
    """
    return render(
        active_collection(collection), loss=loss, scope=scope, tablefmt=tablefmt, file=file
    )
