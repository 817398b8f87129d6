"""Small line charts drawn on the server as SVG: no script, no chart library.

A chart names its figure and unit in words (its title, its axis labels, the
latest value), so it reads without colour and without the picture.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 360, 120  # the viewBox; the chart scales to its container
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 8, 22  # room for the axis labels ("23.5 GiB")


@dataclass(frozen=True)
class Series:
    """One figure over time: `values[i]` at `times[i]` (None: no sample then)."""

    title: str  # e.g. "CPU"
    unit: str  # e.g. "%"
    times: Sequence[dt.datetime]
    values: Sequence[float | None]
    floor: float = 0.0  # the lowest value the axis shows
    ceiling: float | None = None  # the highest (None: the data's highest)


def _label(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}"


def line_chart(series: Series) -> Markup:
    """`series` as an inline SVG line chart; a sentence instead when it has no value."""
    known = [(t, v) for t, v in zip(series.times, series.values, strict=True) if v is not None]
    if not known:
        return Markup("<p>{}: no samples in this period.</p>").format(series.title)
    top = series.ceiling if series.ceiling is not None else max(v for _, v in known)
    top = max(top, series.floor + 1e-9)
    start, end = known[0][0], known[-1][0]
    span = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: dt.datetime) -> float:
        return LEFT + plot_w * (at - start).total_seconds() / span

    def y(value: float) -> float:
        share = (min(max(value, series.floor), top) - series.floor) / (top - series.floor)
        return TOP + plot_h * (1 - share)

    points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in known)
    latest_at, latest = known[-1]
    samples = f"{len(known)} sample" + ("" if len(known) == 1 else "s")
    summary = (
        f"{series.title}: latest {_label(latest, series.unit)}, "
        f"highest {_label(max(v for _, v in known), series.unit)}, "
        f"{samples} from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    )
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(summary)}">',
        f"<title>{escape(summary)}</title>",
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" '
        f'y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">'
        f"{escape(_label(top, series.unit))}</text>",
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">'
        f"{escape(_label(series.floor, series.unit))}</text>",
        f'<text x="{LEFT}" y="{HEIGHT - 4}">{start:%m-%d %H:%M}</text>',
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 4}" text-anchor="end">{end:%m-%d %H:%M}</text>',
        f'<polyline class="line" fill="none" points="{points}"/>',
        # the latest sample as a dot: a line of one sample is not drawn
        f'<circle class="dot" cx="{x(latest_at):.1f}" cy="{y(latest):.1f}" r="3"/>',
        "</svg>",
        f'<p class="chart-caption">{escape(summary)}</p>',
    ]
    return Markup("".join(parts))


__all__ = ["Series", "line_chart"]
