"""Latency histograms: how far back a stage's p95 reads, merging them, their percentiles.

Devices send a latency histogram ({"bounds_ms", "counts"}) with each telemetry
window; ingestion merges them per bucket. The gates and the device page merge
buckets' histograms and read percentiles from them. Pure functions, tested on
their own.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Sequence
from typing import Any

# The p95 latencies read the newest buckets: far enough back for about
# LATENCY_SAMPLE_BUCKETS device-buckets (all of a day for a canary of a few
# devices, the last two buckets for a stage of 10,000), never further than
# LATENCY_WINDOW. So a status costs the same on the stage's first day as later.
LATENCY_WINDOW = dt.timedelta(hours=24)
LATENCY_SAMPLE_BUCKETS = 10_000

Histogram = tuple[list[float], list[int]]


def latency_lookback(devices: int, bucket: dt.timedelta) -> dt.timedelta:
    """How far back a stage's p95 latencies read, for a stage of `devices` devices.

    About `LATENCY_SAMPLE_BUCKETS` device-buckets (a device stores one bucket a
    `bucket` per version), at least two buckets (the open one and the last
    whole one), at most `LATENCY_WINDOW`.
    """
    wanted = bucket * (LATENCY_SAMPLE_BUCKETS / max(devices, 1))
    return min(LATENCY_WINDOW, max(2 * bucket, wanted))


def merge_latency(histograms: Sequence[dict[str, Any] | None]) -> Histogram | None:
    """Add latency histograms ({"bounds_ms", "counts"}) that share the most common bounds.

    Histograms with other bounds (another agent version) are left out rather
    than mixed in; None when there is nothing to merge.
    """
    groups: dict[tuple[float, ...], list[int]] = {}
    for item in histograms:
        if not item:
            continue
        bounds, counts = item.get("bounds_ms"), item.get("counts")
        if not isinstance(bounds, list) or not isinstance(counts, list):
            continue
        if len(counts) != len(bounds) + 1:
            continue
        key = tuple(bounds)  # 5 and 5.0 are one key: equal numbers hash alike
        total = groups.get(key)
        added = map(int, counts)
        groups[key] = list(added) if total is None else list(map(operator.add, total, added))
    if not groups:
        return None
    best = max(groups, key=lambda key: sum(groups[key]))
    return [float(bound) for bound in best], groups[best]


def latency_percentile(histogram: Histogram | None, quantile: float) -> float | None:
    """The bound at or below which `quantile` of the requests fell (ms); None when empty.

    Requests in the overflow bin are reported as the highest bound: a lower
    bound of the true value, which is what a ratio against the previous
    version's histogram (same bounds) needs.
    """
    if histogram is None:
        return None
    bounds, counts = histogram
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    needed = quantile * total
    running = 0
    for i, count in enumerate(counts):
        running += count
        if running >= needed:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


__all__ = [
    "LATENCY_SAMPLE_BUCKETS",
    "LATENCY_WINDOW",
    "Histogram",
    "latency_lookback",
    "latency_percentile",
    "merge_latency",
]
