"""Private HTML helpers for the notebook renderings (``_repr_html_``): every text goes through escape."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

__all__ = ["Cell", "escape", "table"]

# A cell is text (escaped here) or a (text, css colour) pair for a coloured, bold cell.
Cell = str | tuple[str, str]

SEVERITY_COLOURS = {"ok": "#1a7f37", "info": "#0969da", "warning": "#9a6700", "error": "#cf222e"}


def _cell(cell: Cell) -> str:
    if isinstance(cell, tuple):
        text, colour = cell
        return f'<td style="color:{escape(colour)}"><b>{escape(text)}</b></td>'
    return f"<td>{escape(cell)}</td>"


def table(css_class: str, caption: str, headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """A captioned table; ``caption``, headers and cells are plain text and are escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="{escape(css_class)}"><p>{escape(caption)}</p><table><tr>{head}</tr>{body}</table></div>'
