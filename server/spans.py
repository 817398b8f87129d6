"""Telemetry counters summed over a span of buckets, from two buckets a device and version.

Each `TelemetryBucket` holds, beside its own counters, their running sums: the
counter over that bucket and every earlier one of the same device, bundle name
and version (`RUNNING`). A span of those buckets, from its first to its last,
then sums as the last bucket's running sum less the first's, plus the first's
own counter. So the sums over a rollout stage's devices read two rows a device
whatever the stage's age, where adding up the buckets read every bucket since the
stage began. Retention may delete early buckets: a span starts at its first
stored bucket, and the difference holds.

`TelemetryLatest` lists each device's versions with stored buckets (and names
the newest, where ingestion's running sums go on from): the keys a span is
read for.

Ingestion keeps the running sums (`server/mqtt/buckets.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session, aliased

from edgefleet.server.db.models import TelemetryBucket, TelemetryLatest

# The counters with running sums: what the rollout gates add up over a stage.
SUMMED = (
    "requests",
    "errors",
    "fallbacks",
    "shadow_requests",
    "shadow_agreements",
    "labelled_count",
    "labelled_correct",
    "labelled_abs_error",
    "labelled_squared_error",
)
RUNNING = {name: f"running_{name}" for name in SUMMED}  # counter -> its running sum's column
FRACTIONAL = frozenset({"labelled_abs_error", "labelled_squared_error"})  # sums of floats

StartCondition = Callable[[Any], ColumnElement[bool]]  # on a bucket's start column


@dataclass(frozen=True)
class SpanSums:
    """`SUMMED` counters added over the spans of several devices and versions, and the
    devices whose spans add up to more than zero of one of them (`active`)."""

    sums: Mapping[str, float]
    active: int = 0

    def count(self, name: str) -> int:
        return int(self.sums[name])


def span_sums(
    session: Session,
    where: ColumnElement[bool],
    *,
    first: StartCondition,
    last: StartCondition | None = None,
    active: str = "requests",
) -> SpanSums:
    """`SUMMED` over the buckets of the devices and versions `where` selects.

    `where` is a condition on `TelemetryLatest` (a device, bundle name and
    version with stored buckets), which may bring in other tables. A span is the
    buckets of one of them from the first whose start meets `first` to the last
    whose start meets `last` (the newest bucket without `last`); the conditions
    must hold from some start on, and up to some start. `SpanSums.active`
    counts the devices whose spans hold some of the counter `active`. Two index
    probes per device and version on the buckets' unique key, and two rows read
    by their ids.
    """
    earliest = aliased(TelemetryBucket, name="span_first")
    latest = aliased(TelemetryBucket, name="span_last")

    def bucket_id(condition: StartCondition | None, newest: bool) -> Any:
        """The id of the key's first (or last) bucket whose start meets `condition`."""
        probe = aliased(TelemetryBucket, name="probe_last" if newest else "probe_first")
        found = select(probe.id).where(
            probe.device_id == TelemetryLatest.device_id,
            probe.bundle_name == TelemetryLatest.bundle_name,
            probe.bundle_version == TelemetryLatest.bundle_version,
        )
        if condition is not None:
            found = found.where(condition(probe.bucket_start))
        order = probe.bucket_start.desc() if newest else probe.bucket_start
        return found.order_by(order).limit(1).correlate(TelemetryLatest).scalar_subquery()

    # Joined by id, each found by its own probe: a condition between the two buckets would
    # let the database scan every bucket between them instead.
    in_order = earliest.bucket_start <= latest.bucket_start

    def spanned(name: str) -> Any:
        column = RUNNING[name]
        between = getattr(latest, column) - getattr(earliest, column) + getattr(earliest, name)
        return case((in_order, between), else_=0)

    row = session.execute(
        select(
            *(func.coalesce(func.sum(spanned(name)), 0) for name in SUMMED),
            func.count(func.distinct(case((spanned(active) > 0, TelemetryLatest.device_id)))),
        )
        .select_from(TelemetryLatest)
        .join(earliest, earliest.id == bucket_id(first, newest=False))
        .join(latest, latest.id == bucket_id(last, newest=True))
        .where(where)
    ).one()
    sums = {
        name: float(value) if name in FRACTIONAL else int(value)
        for name, value in zip(SUMMED, row[:-1], strict=True)
    }
    return SpanSums(sums, active=int(row[-1]))
