"""Plain aligned text tables, the one layout every command, report and benchmark prints."""

from __future__ import annotations

from collections.abc import Sequence


def format_columns(rows: Sequence[Sequence[object]], *, rule: bool = False) -> str:
    """Left-aligned columns two spaces apart; the first row is the header.

    With `rule`, a line of dashes goes under the header. No trailing spaces.
    """
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    if rule:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
