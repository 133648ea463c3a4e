"""Private HTML helpers for the notebook renderings (``_repr_html_``): every text goes through escape."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from itertools import islice
from typing import Final

from twfix._text import printable

__all__ = ["Cell", "escape", "table"]

# A cell is text (escaped here) or a (text, css colour) pair for a coloured, bold cell.
Cell = str | tuple[str, str]

SEVERITY_COLOURS: Final = {"ok": "#1a7f37", "info": "#0969da", "warning": "#9a6700", "error": "#cf222e"}
# Rows shown before a table is cut with "N more" (a busy port can have thousands).
ROWS_SHOWN: Final = 50
_LEFT: Final = "text-align:left;vertical-align:top"


def _text(value: str) -> str:
    return escape(printable(value))


def _cell(cell: Cell) -> str:
    if isinstance(cell, tuple):
        text, colour = cell
        return f'<td style="{_LEFT};color:{escape(colour)}"><b>{_text(text)}</b></td>'
    return f'<td style="{_LEFT}">{_text(cell)}</td>'


def table(
    css_class: str,
    caption: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    *,
    total: int | None = None,
    limit: int = ROWS_SHOWN,
    caption_colour: str | None = None,
) -> str:
    """A captioned, left-aligned table; ``caption``, headers and cells are plain text and are escaped.
    At most ``limit`` rows are shown; the rest are counted in a last "N more" row (``total`` is the
    number of rows when ``rows`` is a generator that should not be exhausted)."""
    shown = list(islice(iter(rows), limit))
    head = "".join(f'<th style="{_LEFT}">{_text(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in shown)
    more = (total if total is not None else len(shown)) - len(shown)
    if more > 0:
        body += f'<tr><td colspan="{len(headers)}" style="{_LEFT}"><i>{more} more</i></td></tr>'
    title = f"<b>{_text(caption)}</b>" if caption_colour else _text(caption)
    colour = f";color:{escape(caption_colour)}" if caption_colour else ""
    return (
        f'<div class="{escape(css_class)}"><p style="{_LEFT}{colour}">{title}</p>'
        f'<table style="{_LEFT}"><tr>{head}</tr>{body}</table></div>'
    )
