"""A rollout stage's telemetry as its gates judge it, and how often a replica reads it.

`read_stage_telemetry` reads what the stage's devices reported: the traffic
and label counts from the buckets' running sums (`edgefleet.server.spans`, two
buckets a device however long the stage has run) and the latency histograms
of the newest buckets (`latency.latency_lookback`), merged here. On a stage of
10,000 devices that is most of a second (docs/scale.md).

The driver judges the current stage at every tick (each second), and operators
poll its status, so a replica keeps each stage's last reading
(`StageTelemetryCache`) for a second per `ROWS_PER_SECOND` rows it read (each
latency histogram, and each device's span of each version): about ten times
what reading them takes on a small server, so that reading takes about a tenth
of the time. A stage of 10,000 devices is then judged on telemetry up to about
15 s old, one of 1,000 devices up to about 6 s. A reading kept for
less than a second is not kept: a small stage is read afresh at every
judgement. The rule counts rows, not time, so that what is kept does not
depend on how loaded the machine is. Device states, drift alerts and the
stage's age are never kept (`progress.stage_counts`).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from edgefleet.server.db.models import (
    BundleRow,
    Rollout,
    RolloutDevice,
    TelemetryBucket,
    TelemetryLatest,
)
from edgefleet.server.drift.accuracy import Labelled
from edgefleet.server.rollouts.latency import latency_lookback, latency_percentile, merge_latency
from edgefleet.server.spans import SpanSums, span_sums

# A reading is kept a second per this many rows read (about 0.1 s of reading them with
# SQLite on 2 shared cores, docs/scale.md); less than a second, not at all.
ROWS_PER_SECOND = 4_000


@dataclass(frozen=True)
class StageTelemetry:
    """What the stage's devices reported, as `gates.StageCounts` holds it."""

    reporting: int
    requests: int
    errors: int
    fallbacks: int
    latency_p95_ms: float | None
    previous_latency_p95_ms: float | None
    latency_minutes: int
    shadow_requests: int
    shadow_agreements: int
    labels: Labelled
    previous_labels: Labelled
    rows: int  # what the reading read: latency histograms, and a span a device and version
    read_at: dt.datetime


def read_stage_telemetry(
    session: Session,
    rollout: Rollout,
    bundle: BundleRow,
    in_stage: ColumnElement[bool],
    *,
    shadow: bool,
    devices: int,
    now: dt.datetime,
    bucket: dt.timedelta,
) -> StageTelemetry:
    """The telemetry of the current stage (its `RolloutDevice` rows: `in_stage`; `devices`
    of them) since it started.

    Counts are of buckets that may hold windows since the stage started
    (`bucket_start > stage_started_at - bucket`) on the stage's own devices:
    for the new version in a normal stage; in a shadow stage the serving
    version's windows carry the challenger's comparisons, so shadow counts come
    from every version of the bundle's name. The previous version's labels are
    counted over as long before the stage as it has run.
    """
    started = rollout.stage_started_at or now
    elapsed = max(dt.timedelta(0), now - started)
    since = started - bucket
    of_stage = and_(
        TelemetryLatest.device_id == RolloutDevice.device_id,
        in_stage,
        TelemetryLatest.bundle_name == bundle.name,
    )
    new_version = span_sums(
        session,
        and_(of_stage, TelemetryLatest.bundle_version == bundle.version),
        first=lambda start: start > since,
    )
    lookback = latency_lookback(devices, bucket)
    start = TelemetryBucket.bucket_start
    histograms = _latencies(
        session, in_stage, bundle.name, bundle.version, start > max(since, now - lookback)
    )
    previous_histograms = _latencies(
        session,
        in_stage,
        bundle.name,
        RolloutDevice.previous_version,
        start < started,
        start >= started - lookback,
    )
    previous_labels = span_sums(
        session,
        and_(of_stage, TelemetryLatest.bundle_version == RolloutDevice.previous_version),
        first=lambda start: start >= started - elapsed,
        last=lambda start: start < started,
    )
    compared = (
        span_sums(session, of_stage, first=lambda start: start > since, active="shadow_requests")
        if shadow
        else None
    )
    return StageTelemetry(
        reporting=(compared or new_version).active,
        requests=new_version.count("requests"),
        errors=new_version.count("errors"),
        fallbacks=new_version.count("fallbacks"),
        latency_p95_ms=latency_percentile(merge_latency(histograms), 0.95),
        previous_latency_p95_ms=latency_percentile(merge_latency(previous_histograms), 0.95),
        latency_minutes=round(lookback.total_seconds() / 60),
        shadow_requests=compared.count("shadow_requests") if compared else 0,
        shadow_agreements=compared.count("shadow_agreements") if compared else 0,
        labels=_labelled(new_version),
        previous_labels=_labelled(previous_labels),
        rows=len(histograms) + len(previous_histograms) + devices * (3 if shadow else 2),
        read_at=now,
    )


def _latencies(
    session: Session,
    in_stage: ColumnElement[bool],
    name: str,
    version: str | InstrumentedAttribute[str | None],
    *when: ColumnElement[bool],
) -> Sequence[Any]:
    """The latency histograms of the stage's buckets of one version, at times `when`."""
    return session.scalars(
        select(TelemetryBucket.latency).where(
            TelemetryBucket.device_id == RolloutDevice.device_id,
            in_stage,
            TelemetryBucket.bundle_name == name,
            TelemetryBucket.bundle_version == version,
            *when,
        )
    ).all()


def _labelled(sums: SpanSums) -> Labelled:
    """The labelled feedback in span sums."""
    return Labelled(
        sums.count("labelled_count"),
        sums.count("labelled_correct"),
        float(sums.sums["labelled_abs_error"]),
        float(sums.sums["labelled_squared_error"]),
    )


# A stage's reading is of one rollout, stage, start and kind (shadow or not).
StageKey = tuple[int, int, dt.datetime | None, bool]


@dataclass(frozen=True)
class _Kept:
    telemetry: StageTelemetry
    read_at: dt.datetime
    until: dt.datetime


class StageTelemetryCache:
    """The last reading of each stage's telemetry in this replica, kept a second per
    `ROWS_PER_SECOND` rows it read (see the module's docstring). Shared by the driver's
    thread and the API's; `now` is the caller's clock."""

    def __init__(self) -> None:
        self._kept: dict[StageKey, _Kept] = {}
        self._lock = threading.Lock()

    def read(
        self, key: StageKey, now: dt.datetime, reading: Callable[[], StageTelemetry]
    ) -> StageTelemetry:
        """The reading kept for `key` while it is fresh enough at `now`; else `reading()`,
        kept when it read enough rows."""
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and kept.read_at <= now < kept.until:
            return kept.telemetry
        telemetry = reading()
        keep_s = telemetry.rows / ROWS_PER_SECOND
        with self._lock:
            for old in [k for k, v in self._kept.items() if now >= v.until]:
                del self._kept[old]
            if keep_s >= 1:
                self._kept[key] = _Kept(telemetry, now, now + dt.timedelta(seconds=keep_s))
            else:
                self._kept.pop(key, None)
        return telemetry


def stage_key(rollout: Rollout, stage_index: int, shadow: bool) -> StageKey:
    return (rollout.id, stage_index, rollout.stage_started_at, shadow)


__all__ = [
    "ROWS_PER_SECOND",
    "StageTelemetry",
    "StageTelemetryCache",
    "read_stage_telemetry",
    "stage_key",
]
