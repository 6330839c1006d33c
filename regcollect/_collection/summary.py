"""Seeing the penalties: rows from ``regcollect._readout`` rendered as a ``Summary``.

Renders what the last ``loss()`` computed (one device-to-host copy for the whole table) and
never computes a penalty itself. A ``Summary`` is the table as a ``str`` that also renders as
an HTML table in Jupyter and as Markdown where asked; views fold the rows into the largest
``top`` ones, one row per module, or the total alone.
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any, Literal

import torch
from tabulate import tabulate, tabulate_formats

from ..regularizers import Regularizer
from ..schedules import Schedule
from .entries import ACTIVITY, WEIGHT, Entry
from .readout import Row, as_dict, with_total

__all__ = [
    "VIEWS",
    "Summary",
    "View",
    "check_view",
    "compact",
    "render",
    "table_extra",
    "values_by",
]

View = Literal["entry", "module", "total"]
VIEWS: tuple[View, ...] = ("entry", "module", "total")
_MARKDOWN = ("github", "pipe")  # the tabulate formats that are Markdown tables
_HTML = ("html", "unsafehtml")
_NUMBERS = ("penalty", "% of reg.", "% of loss")  # right-aligned columns

# (name, shape or count, regularizer, penalty or None): one row of the table before the
# shares are computed.
Line = tuple[str, str, str, "float | None"]


class Summary(str):
    """The table of penalties: a ``str`` (the table in the requested ``tablefmt``) that
    Jupyter shows as an HTML table and that offers its Markdown form.

    ``summary()`` shows it when called: printed, or in IPython and Jupyter displayed, once (the
    cell's value is not shown a second time). Its ``repr`` is one line, so the table printed at
    the Python prompt is not repeated either; ``str()`` or ``print()`` give the table.

    Examples:
        >>> import io, torch, regcollect as rc
        >>> model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer=rc.l2(0.5)))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> _ = rc.loss(model)
        >>> table = rc.summary(scope=model, file=io.StringIO())
        >>> table
        <regcollect summary: 1 row, total 2>
        >>> print(table._repr_markdown_())
        | name     | shape   | regularizer   |   penalty |   % of reg. |
        |:---------|:--------|:--------------|----------:|------------:|
        | 0.weight | 2x2     | L2(l2=0.5)    |         2 |     100.00% |
        | total    |         |               |         2 |     100.00% |
    """

    _headers: list[str]
    _cells: list[list[str]]
    _align: tuple[str, ...]
    _footer: str
    _total: float
    _fmt: str
    # The IPython execution count of the cell that displayed it: that cell's value is not
    # displayed again.
    _shown_in: int | None = None

    @classmethod
    def build(
        cls,
        headers: list[str],
        cells: list[list[str]],
        footer: str,
        total: float,
        tablefmt: str,
    ) -> Summary:
        """The table of ``cells`` under ``headers``, then ``footer``, in ``tablefmt``."""
        align = tuple("right" if h in _NUMBERS else "left" for h in headers)
        text = tabulate(
            cells, headers=headers, tablefmt=tablefmt, disable_numparse=True, colalign=align
        )
        if footer:
            # A Markdown table runs on into the next line unless a blank line ends it.
            text += ("\n\n" if tablefmt in _MARKDOWN else "\n") + footer
        self = cls(text)
        self._headers, self._cells, self._align = headers, cells, align
        self._footer, self._total, self._fmt = footer, total, tablefmt
        return self

    def __repr__(self) -> str:
        rows = len(getattr(self, "_cells", ())) - 1
        total = getattr(self, "_total", math.nan)
        return f"<regcollect summary: {rows} row{'' if rows == 1 else 's'}, total {total:.6g}>"

    def _repr_html_(self) -> str:
        if self._fmt in _HTML:
            return str(self)
        head = "".join(_cell("th", h, a) for h, a in zip(self._headers, self._align))
        body = "".join(
            "<tr>" + "".join(_cell("td", c, a) for c, a in zip(row, self._align)) + "</tr>"
            for row in self._cells
        )
        footer = f"<p>{html.escape(self._footer)}</p>" if self._footer else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{footer}"

    def _repr_markdown_(self) -> str:
        if self._fmt in _MARKDOWN:
            return str(self)
        cells = [[c.replace("|", "\\|") for c in row] for row in self._cells]
        text = tabulate(
            cells, headers=self._headers, tablefmt="pipe", disable_numparse=True,
            colalign=self._align,
        )  # fmt: skip
        return text + (f"\n\n{self._footer}" if self._footer else "")

    def _mimebundle(self) -> dict[str, str]:
        bundle = {"text/plain": str(self)}
        if self._fmt in _MARKDOWN:
            bundle["text/markdown"] = self._repr_markdown_()
        else:
            bundle["text/html"] = self._repr_html_()
        return bundle

    def _ipython_display_(self) -> None:
        # IPython calls this for a cell's value instead of computing the representations.
        shell = _ipython_shell()
        if shell is not None and self._shown_in == shell.execution_count:
            return  # summary() displayed it in this very cell
        self.show()

    def show(self, file: IO[str] | None = None) -> None:
        """Print the table to ``file``; by default to stdout, or in IPython and Jupyter
        display it (an HTML table in a notebook).

        Args:
            file: Where to print; given, nothing is displayed.
        """
        shell = _ipython_shell() if file is None else None
        if shell is None:
            print(self, file=file if file is not None else sys.stdout)
            return
        from IPython.display import display  # present: the shell is IPython's

        self._shown_in = shell.execution_count
        display(self._mimebundle(), raw=True)


def _cell(tag: str, text: str, align: str) -> str:
    style = ' style="text-align: right;"' if align == "right" else ""
    return f"<{tag}{style}>{html.escape(text)}</{tag}>"


def _ipython_shell() -> Any:
    """The running IPython shell (a Jupyter kernel's too), or None; never imports IPython."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return get() if callable(get) else None


def _percent(part: float | None, whole: float | None) -> str:
    if part is None:
        return "-"
    if whole is None:
        return ""
    if whole <= 0:  # no penalty at all, or a loss whose share means nothing
        return "-"
    return f"{100.0 * part / whole:.2f}%"


def _loss_footer(loss_value: float, total: float) -> str:
    footer = f"total loss: {loss_value:.6g}"
    if 0 < loss_value < total:  # the data loss alone, or another model's loss
        footer += f", smaller than the penalties shown ({total:.6g}): pass the total loss "
        footer += "(data loss + rc.loss()), and scope= the model it is the loss of"
    return footer


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


def check_view(top: object, by: object, depth: object) -> None:
    """Check ``summary``'s view arguments: ``top`` rows, grouped ``by``, to ``depth``."""
    for name, value in (("top", top), ("depth", depth)):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if value is not None and bad:
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if by not in VIEWS:
        raise ValueError(f"by must be one of {', '.join(map(repr, VIEWS))}, got {by!r}")
    if depth is not None and by != "module":
        raise ValueError(f"depth applies to by='module' only, got by={by!r}")


def _schedule_at(schedule: Schedule, step: int) -> str:
    kind = type(schedule).__name__.removesuffix("Schedule").lower() or "schedule"
    try:
        now = f"{float(schedule.value(step)):.4g}"
    except Exception:  # a table must show; the value's own error comes where it is used
        now = "?"
    return f"{now} {kind}@{step}"


def compact(regularizer: Regularizer, steps: Mapping[int, int] | None = None) -> str:
    """The regularizer for the table: its ``repr``, with each schedule shown as its value,
    kind and step (``L2(l2=0.0075 linear@3)``) instead of its whole configuration: at the
    step in ``steps`` (``{id(schedule): step}``, those of the values shown), else now."""
    try:
        config = regularizer.get_config()
    except Exception:  # custom ones need not be configurable
        return repr(regularizer)
    if not any(isinstance(v, Schedule) for v in config.values()):
        return repr(regularizer)
    steps = steps or {}
    args = ", ".join(
        f"{k}={_schedule_at(v, steps.get(id(v), v.step)) if isinstance(v, Schedule) else repr(v)}"
        for k, v in config.items()
    )
    return f"{type(regularizer).__name__}({args})"


def _no_shape(entry: Entry) -> str:
    return "output" if entry.kind == ACTIVITY else "-"  # a weight whose tensor is gone


def _module_of(entry: Entry, name: str, depth: int | None) -> str:
    """The module an entry's row folds into: its name without the parameter (or
    ``:activity``), cut to ``depth`` dotted parts after any scope prefix."""
    if entry.kind == ACTIVITY:
        name = name.removesuffix(":activity")
    elif entry.kind == WEIGHT and entry.param and name.endswith(entry.param):
        name = name[: -len(entry.param)].removesuffix(".")
    prefix = entry.prefix if name.startswith(entry.prefix) else ""
    path = name[len(prefix) :]
    if depth is not None:
        path = ".".join(path.split(".")[:depth])
    return prefix + path if prefix + path else "(root)"


def values_by(
    rows: list[Row], total: float, by: View, depth: int | None, prefix: str | None = None
) -> dict[str, float]:
    """``penalties()``'s dict in a summary view: a value per entry, per module (the rows the
    summary folds together, by ``_module_of``) or the total alone.

    With a ``prefix`` (the loggers' keys), the sum is ``{prefix}total`` and each row is
    ``{prefix}penalty/{entry}`` or ``{prefix}module/{module}``: in a namespace of its own, so
    that no name (a root parameter called ``total``) can take the sum's key."""
    if by == "entry" and prefix is None:
        return as_dict(rows, total)
    out: dict[str, float] = {}
    for entry, name, value in rows if by != "total" else ():
        if value is not None:
            key = name if by == "entry" else _module_of(entry, name, depth)
            out[key] = out.get(key, 0.0) + value
    if prefix is None:
        return with_total(out, total)
    space = f"{prefix}{'penalty' if by == 'entry' else 'module'}/"
    return {**{space + key: value for key, value in out.items()}, f"{prefix}total": total}


def _sum(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


# Each entry's schedules' steps when its value was computed ({id(schedule): step}).
Steps = Mapping[Entry, Mapping[int, int]]


def _by_module(rows: list[Row], depth: int | None, steps: Steps) -> list[Line]:
    groups: dict[str, list[tuple[str, float | None]]] = {}
    for entry, name, value in rows:
        groups.setdefault(_module_of(entry, name, depth), []).append(
            (compact(entry.regularizer, steps.get(entry)), value)
        )
    lines: list[Line] = []
    for module, members in groups.items():
        kinds = list(dict.fromkeys(reg for reg, _ in members))
        shown = ", ".join(kinds if len(kinds) <= 3 else [*kinds[:2], f"+{len(kinds) - 2} more"])
        lines.append((module, str(len(members)), shown, _sum([v for _, v in members])))
    return lines


def _by_entry(rows: list[Row], steps: Steps) -> list[Line]:
    return [
        (
            name,
            "x".join(map(str, entry.shape)) if entry.shape is not None else _no_shape(entry),
            compact(entry.regularizer, steps.get(entry)),
            value,
        )
        for entry, name, value in rows
    ]


def _top(lines: list[Line], top: int | None) -> list[Line]:
    """The ``top`` largest lines, largest first, and one line summing the others."""
    if top is None or len(lines) <= top:
        return lines
    ranked = sorted(lines, key=lambda line: -math.inf if line[3] is None else line[3], reverse=True)
    rest = ranked[top:]
    return [*ranked[:top], ("others", f"({len(rest)})", "", _sum([line[3] for line in rest]))]


def render(
    rows: list[Row],
    total: float,
    loss_value: float | None,
    steps: Steps | None = None,
    *,
    tablefmt: str = "simple",
    file: IO[str] | None = None,
    top: int | None = None,
    by: View = "entry",
    depth: int | None = None,
) -> Summary:
    """Build, show (``Summary.show``, to ``file``) and return the summary of ``rows``."""
    if by == "total":
        headers, lines = ["name", "penalty", "% of loss"], []
    else:
        headers = ["name", "shape", "regularizer", "penalty", "% of reg.", "% of loss"]
        if by == "module":
            headers[:2] = ["module", "entries"]
        steps = steps or {}
        lines = _top(
            _by_module(rows, depth, steps) if by == "module" else _by_entry(rows, steps), top
        )
    if loss_value is None:
        headers.pop()
    cells: list[list[str]] = []
    for name, shape, regularizer, value in [*lines, ("total", "", "", total)]:
        row = [name, _value(value)] if by == "total" else [name, shape, regularizer, _value(value)]
        if by != "total":
            row.append(_percent(value, total) if lines or name != "total" else "")
        if loss_value is not None:
            row.append(_percent(value, loss_value))
        cells.append(row)
    footer = "" if loss_value is None else _loss_footer(loss_value, total)
    summary = Summary.build(headers, cells, footer, total, tablefmt)
    summary.show(file)
    return summary
