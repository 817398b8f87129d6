"""Pure merging of telemetry windows into per-bucket aggregates (no I/O).

A `TelemetryAggregate` is what one `TelemetryBucket` row holds: counters that
add, a latency histogram and per-feature bin counts. Merging rules:
- counters add, and so do the sums of regression errors;
- latency histograms add element-wise only when their bounds are equal; a
  window with other bounds is not merged into the histogram (its counters
  still are) and is counted in `latency_skipped`;
- bin counts add per feature only when the number of bins is equal; a
  feature with another shape is skipped the same way (`bins_skipped`).
Within one bundle version the agent counts into the bundle's own bins and
bounds, so a mismatch means a misbehaving device, not a normal case.

The same functions merge a window into an aggregate and an aggregate into a
stored row, so the in-memory and the stored form cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.mqtt.messages import BinCounts, TelemetryWindow

Latency = dict[str, Any]  # {"bounds_ms": [...], "counts": [...]}
Bins = dict[str, dict[str, dict[str, Any]]]  # {"inputs"|"outputs": {feature: {...}}}

# Device.health from the error and fallback rates of the device's last hour of requests
# (its telemetry buckets, judged at each flush: batch.py), taken over at least
# MIN_REQUESTS requests (see health_of).
DEGRADED_RATE = 0.05
FAILING_RATE = 0.20
MIN_REQUESTS = 20

_COUNTERS = (
    "windows",
    "requests",
    "errors",
    "fallbacks",
    "schema_violations",
    "dropped_windows",
    "shadow_requests",
    "shadow_agreements",
    "labelled_count",
    "labelled_correct",
)
# Regression feedback: sums of |error| and error squared over the labelled answers.
_SUMS = ("labelled_abs_error", "labelled_squared_error")


def bucket_start(window_start: dt.datetime, bucket: dt.timedelta) -> dt.datetime:
    """The start of the bucket (aligned to the epoch, UTC) that `window_start` falls in."""
    size = int(bucket.total_seconds())
    if size <= 0:
        raise ValueError(f"telemetry bucket {bucket} is not positive")
    seconds = int(window_start.timestamp())
    return dt.datetime.fromtimestamp(seconds - seconds % size, dt.timezone.utc)


def health_of(requests: int, errors: int, fallbacks: int) -> str | None:
    """ok / degraded / failing from the rates of a span's requests (the server judges a
    device's last hour); None when it served nothing.

    A rate is taken over at least MIN_REQUESTS requests, the missing ones counted
    as answered: one failed batch in a quiet hour (1 of 1: 1/20 = 5%) is not a
    failing device, while 5 failures of 5 (25%) are.
    """
    if requests <= 0:
        return None
    rate = max(errors, fallbacks) / max(requests, MIN_REQUESTS)
    if rate > FAILING_RATE:
        return "failing"
    if rate > DEGRADED_RATE:
        return "degraded"
    return "ok"


@dataclass
class TelemetryAggregate:
    """Telemetry merged over windows of one device, bundle version and bucket."""

    windows: int = 0
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    schema_violations: int = 0
    dropped_windows: int = 0
    shadow_requests: int = 0
    shadow_agreements: int = 0
    labelled_count: int = 0
    labelled_correct: int = 0
    labelled_abs_error: float = 0.0
    labelled_squared_error: float = 0.0
    latency: Latency = field(default_factory=dict)
    bins: Bins = field(default_factory=dict)
    latency_skipped: int = 0  # windows whose latency bounds differed (not merged)
    bins_skipped: int = 0  # features whose bin count differed (not merged)

    def add_window(self, window: TelemetryWindow) -> None:
        """Merge one validated window in."""
        self.windows += 1
        self.requests += window.requests
        self.errors += window.errors
        self.fallbacks += window.fallbacks
        self.schema_violations += window.schema_violations
        self.dropped_windows += window.dropped_windows
        shadow, labelled = window.shadow, window.labelled
        if shadow is not None:
            self.shadow_requests += shadow.requests
            self.shadow_agreements += shadow.agreements
        if labelled is not None:
            self.labelled_count += labelled.count
            self.labelled_correct += labelled.correct
            self.labelled_abs_error += labelled.abs_error or 0.0
            self.labelled_squared_error += labelled.squared_error or 0.0
        latency = window.latency
        if not merge_latency(self.latency, latency.bounds_ms, latency.counts):
            self.latency_skipped += 1
        if window.inputs:
            self.bins_skipped += _merge_model_bins(
                self.bins.setdefault("inputs", {}), window.inputs
            )
        if window.outputs:
            self.bins_skipped += _merge_model_bins(
                self.bins.setdefault("outputs", {}), window.outputs
            )

    def merge(self, other: TelemetryAggregate) -> None:
        """Merge another aggregate (of the same key) in."""
        for name in _COUNTERS + _SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.latency and not merge_latency(
            self.latency, other.latency["bounds_ms"], other.latency["counts"]
        ):
            self.latency_skipped += 1
        self.bins_skipped += merge_bins(self.bins, other.bins)
        self.latency_skipped += other.latency_skipped
        self.bins_skipped += other.bins_skipped

    def counters(self) -> dict[str, int | float]:
        """The additive counters and sums by column name of `TelemetryBucket`."""
        return {name: getattr(self, name) for name in _COUNTERS + _SUMS}


def merge_latency(target: Latency, bounds_ms: list[float], counts: list[int]) -> bool:
    """Add a histogram into `target` (in place; empty target takes a copy).

    Returns False, and leaves `target` alone, when the bounds differ.
    """
    if not target:
        target["bounds_ms"] = list(bounds_ms)
        target["counts"] = list(counts)
        return True
    if target["bounds_ms"] != bounds_ms or len(target["counts"]) != len(counts):
        return False
    target["counts"] = _added(target["counts"], counts)
    return True


def _merge_model_bins(target: dict[str, dict[str, Any]], features: dict[str, BinCounts]) -> int:
    # _merge_feature, inlined: this runs for every feature of every window received.
    skipped = 0
    for name, bins in features.items():
        current = target.get(name)
        if current is None:
            target[name] = {
                "counts": list(bins.counts),
                "nan": bins.nan,
                "below": bins.below,
                "above": bins.above,
            }
        elif len(current["counts"]) == len(bins.counts):
            current["counts"] = _added(current["counts"], bins.counts)
            current["nan"] += bins.nan
            current["below"] += bins.below
            current["above"] += bins.above
        else:
            skipped += 1
    return skipped


def merge_bins(target: Bins, other: Bins) -> int:
    """Add stored-form bins `other` into `target` (in place); returns features skipped."""
    skipped = 0
    for side, features in other.items():
        into = target.setdefault(side, {})
        for name, b in features.items():
            if not _merge_feature(into, name, b["counts"], b["nan"], b["below"], b["above"]):
                skipped += 1
    return skipped


def _merge_feature(
    target: dict[str, dict[str, Any]],
    name: str,
    counts: list[int],
    nan: int,
    below: int,
    above: int,
) -> bool:
    current = target.get(name)
    if current is None:
        target[name] = {"counts": list(counts), "nan": nan, "below": below, "above": above}
        return True
    if len(current["counts"]) != len(counts):
        return False
    current["counts"] = _added(current["counts"], counts)
    current["nan"] += nan
    current["below"] += below
    current["above"] += above
    return True


def _added(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two lists of equal length (checked by the callers)."""
    return list(map(operator.add, a, b))


def aggregate_from_row(
    counters: Mapping[str, float | None], latency: Latency | None, bins: Bins | None
) -> TelemetryAggregate:
    """An aggregate holding what a stored bucket row holds (copies, safe to mutate)."""
    agg = TelemetryAggregate()
    for name in _COUNTERS:
        setattr(agg, name, int(counters.get(name) or 0))
    for name in _SUMS:
        setattr(agg, name, float(counters.get(name) or 0.0))
    if latency:
        merge_latency(agg.latency, latency["bounds_ms"], latency["counts"])
    if bins:
        merge_bins(agg.bins, bins)
    return agg


__all__ = [
    "DEGRADED_RATE",
    "FAILING_RATE",
    "MIN_REQUESTS",
    "TelemetryAggregate",
    "aggregate_from_row",
    "bucket_start",
    "health_of",
    "merge_bins",
    "merge_latency",
]
