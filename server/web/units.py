"""Figures in words for the pages: every number with its unit, "none" rather than a blank."""

from __future__ import annotations


def percent(share: float | None, missing: str = "no data") -> str:
    """0.0123 -> "1.23%"; None -> `missing`."""
    if share is None:
        return missing
    return f"{100 * share:.3g}%"


def size(count: float | None) -> str:
    """Bytes in a readable unit: 1536 -> "1.5 KiB"."""
    if count is None:
        return "unknown"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


def millis(value: float | None) -> str:
    """A latency: "12.5 ms", or "no requests"."""
    return "no requests" if value is None else f"{value:.3g} ms"


def number(value: float | None, unit: str = "", missing: str = "none") -> str:
    """A figure with its unit, three significant digits: 0.1234 -> "0.123"."""
    if value is None:
        return missing
    return f"{value:.3g}{' ' + unit if unit else ''}"


__all__ = ["millis", "number", "percent", "size"]
