"""Merging telemetry windows: counters add, histograms and bins only when shapes agree."""

from __future__ import annotations

import datetime as dt

import pytest

from edgefleet.mqtt.messages import BinCounts, LabelledCounts, LatencyHistogram, ShadowCounts
from edgefleet.server.mqtt.aggregate import (
    TelemetryAggregate,
    aggregate_from_row,
    bucket_start,
    health_of,
    merge_latency,
)
from tests.server.fleet import telemetry_window

T0 = dt.datetime(2026, 1, 1, 12, 3, 17, tzinfo=dt.timezone.utc)


def test_bucket_start_aligns_to_the_bucket() -> None:
    assert bucket_start(T0, dt.timedelta(minutes=5)) == T0.replace(minute=0, second=0)
    assert bucket_start(T0, dt.timedelta(hours=1)) == T0.replace(minute=0, second=0)
    aligned = T0.replace(minute=5, second=0)
    assert bucket_start(aligned, dt.timedelta(minutes=5)) == aligned


def test_bucket_start_refuses_an_empty_bucket() -> None:
    with pytest.raises(ValueError):
        bucket_start(T0, dt.timedelta(0))


@pytest.mark.parametrize(
    ("requests", "errors", "fallbacks", "health"),
    [
        (0, 0, 0, None),
        (100, 0, 0, "ok"),
        (100, 5, 0, "ok"),
        (100, 6, 0, "degraded"),
        (100, 0, 20, "degraded"),
        (100, 21, 0, "failing"),
        (100, 3, 30, "failing"),
        # A rate over at least 20 requests: one failed batch in a quiet window is 1/20.
        (500, 1, 0, "ok"),
        (1, 1, 0, "ok"),
        (1, 0, 1, "ok"),
        (2, 2, 0, "degraded"),
        (5, 5, 0, "failing"),
        (500, 120, 0, "failing"),
    ],
)
def test_health_from_the_worse_of_error_and_fallback_rate(
    requests: int, errors: int, fallbacks: int, health: str | None
) -> None:
    assert health_of(requests, errors, fallbacks) == health


def test_windows_add_up() -> None:
    agg = TelemetryAggregate()
    agg.add_window(telemetry_window("d1", T0, requests=100, errors=3, fallbacks=1))
    agg.add_window(telemetry_window("d1", T0 + dt.timedelta(minutes=1), requests=50, errors=1))
    assert (agg.windows, agg.requests, agg.errors, agg.fallbacks) == (2, 150, 4, 1)
    assert agg.latency["bounds_ms"] == [5.0, 10.0, 50.0, 100.0]
    assert sum(agg.latency["counts"]) == 150
    assert agg.bins["inputs"]["f0"]["counts"] == [15] * 10
    assert agg.bins["inputs"]["f0"]["below"] == 0
    assert agg.bins["outputs"]["y"]["counts"] == [15] * 10
    assert (agg.latency_skipped, agg.bins_skipped) == (0, 0)


def test_shadow_and_labelled_counts_add() -> None:
    window = telemetry_window("d1", T0).model_copy(
        update={
            "shadow": ShadowCounts(requests=10, agreements=9),
            "labelled": LabelledCounts(count=4, correct=3),
            "dropped_windows": 2,
        }
    )
    agg = TelemetryAggregate()
    agg.add_window(window)
    agg.add_window(window.model_copy(update={"window_start": "2026-01-01T12:10:00Z"}))
    assert (agg.shadow_requests, agg.shadow_agreements) == (20, 18)
    assert (agg.labelled_count, agg.labelled_correct, agg.dropped_windows) == (8, 6, 4)


def test_a_histogram_with_other_bounds_is_not_merged() -> None:
    agg = TelemetryAggregate()
    agg.add_window(telemetry_window("d1", T0, requests=100))
    other = telemetry_window("d1", T0, requests=10).model_copy(
        update={"latency": LatencyHistogram(bounds_ms=[1.0, 2.0], counts=[5, 3, 2])}
    )
    agg.add_window(other)
    assert agg.requests == 110  # counters still add
    assert sum(agg.latency["counts"]) == 100
    assert agg.latency_skipped == 1


def test_a_feature_with_another_bin_count_is_skipped_others_merge() -> None:
    agg = TelemetryAggregate()
    agg.add_window(telemetry_window("d1", T0, requests=100))
    odd = telemetry_window("d1", T0, requests=100)
    odd = odd.model_copy(
        update={"inputs": {**odd.inputs, "f0": BinCounts(counts=[1, 2], nan=1, below=0, above=0)}}
    )
    agg.add_window(odd)
    assert agg.bins["inputs"]["f0"]["counts"] == [10] * 10
    assert agg.bins["inputs"]["f1"]["counts"] == [20] * 10
    assert agg.bins_skipped == 1


def test_merge_and_round_trip_through_the_stored_form() -> None:
    a, b = TelemetryAggregate(), TelemetryAggregate()
    a.add_window(telemetry_window("d1", T0, requests=100, errors=2))
    b.add_window(telemetry_window("d1", T0, requests=40, fallbacks=4))
    stored = aggregate_from_row(a.counters(), a.latency, a.bins)
    stored.merge(b)
    assert stored.counters()["requests"] == 140
    assert stored.counters()["errors"] == 2
    assert stored.counters()["fallbacks"] == 4
    assert stored.counters()["windows"] == 2
    assert sum(stored.latency["counts"]) == 140
    # merging copies: the sources are unchanged
    assert a.requests == 100 and sum(a.latency["counts"]) == 100
    assert b.bins["inputs"]["f0"]["counts"] == [4] * 10


def test_merge_latency_into_empty_copies() -> None:
    target: dict[str, list[float] | list[int]] = {}
    counts = [1, 2, 3]
    assert merge_latency(target, [1.0, 2.0], counts)
    counts[0] = 99
    assert target["counts"] == [1, 2, 3]
    assert not merge_latency(target, [1.0, 3.0], [1, 1, 1])
    assert merge_latency(target, [1.0, 2.0], [1, 1, 1])
    assert target["counts"] == [2, 3, 4]
