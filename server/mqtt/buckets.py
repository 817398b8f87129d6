"""Storing telemetry aggregates as buckets, with their running sums (`edgefleet.server.spans`).

`store_buckets` reads the stored buckets of the batch's keys (locked on
PostgreSQL), merges into them and inserts the rest, as bulk statements: a
flush carries hundreds of buckets, and ORM objects would cost more than the
SQL. When another replica inserted the same bucket first, the unit of work
fails on the unique key; the caller retries and merges into that row.

Running sums: a flush almost always adds to a device's newest bucket of a
version or starts a newer one, and its running sums go on from the newest
bucket's (`TelemetryLatest` names it). A bucket older than the newest (an
agent's outbox replayed after an outage, while it also sends live) changes the
running sums of every later bucket of its device and version: they are
computed again from the bucket before it, with a statement for that key.

The batch's aggregates are only read, so a failed write can be retried as it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, insert, select, update
from sqlalchemy.orm import Session

from edgefleet.server.db.models import TelemetryBucket, TelemetryLatest
from edgefleet.server.db.rows import as_utc, in_chunks
from edgefleet.server.mqtt.aggregate import TelemetryAggregate, aggregate_from_row
from edgefleet.server.spans import RUNNING, SUMMED

BucketKey = tuple[str, str, str, dt.datetime]  # device, bundle name, version, bucket start
Key = tuple[str, str, str]  # device, bundle name, version: the buckets one running sum spans
_RUNNING_ZERO = dict.fromkeys(RUNNING.values(), 0)


def store_buckets(
    session: Session, telemetry: Mapping[BucketKey, TelemetryAggregate], *, lock: bool
) -> None:
    """Merge `telemetry` into the stored buckets and insert the rest; keep the running sums
    and `TelemetryLatest`. `lock`: read the stored rows FOR NO KEY UPDATE (PostgreSQL)."""
    if not telemetry:
        return
    table = cast(Table, TelemetryBucket.__table__)
    devices = sorted({key[0] for key in telemetry})
    stored = _stored(session, table, devices, sorted({key[3] for key in telemetry}), lock)
    newest = _newest(session, devices)
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    replayed: dict[Key, dt.datetime] = {}  # keys with a bucket before their newest: its start
    for key, buckets in _by_key(telemetry).items():
        newest_start, running = newest.get(key, (None, {}))
        if newest_start is not None and buckets[0][0] < newest_start:
            replayed[key] = buckets[0][0]
        for start, aggregate in buckets:
            found = stored.get((*key, start))
            if found is None:
                # The batch's own lists and dicts, only read by the statement (serialised
                # to JSON), so the batch stays intact for a retry without a copy.
                values = _bucket_values(aggregate)
                values.update(
                    device_id=key[0], bundle_name=key[1], bundle_version=key[2], bucket_start=start
                )
                inserts.append(values)
            else:
                merged = aggregate_from_row(found._mapping, found.latency, found.bins)
                merged.merge(aggregate)  # copies: the batch stays intact for a retry
                values = _bucket_values(merged)
                values["bucket_id"] = found.id
                updates.append(values)
            if key in replayed:
                values.update(_RUNNING_ZERO)  # computed again below, once written
            else:
                running = run_on(running, aggregate.counters())  # what this flush adds
                values.update({RUNNING[name]: running[name] for name in SUMMED})
    # Core statements, executemany: ORM bulk statements cost more per row than the SQL.
    if updates:
        session.execute(update(table).where(table.c.id == bindparam("bucket_id")), updates)
    if inserts:
        session.execute(insert(table), inserts)
    for key, since in replayed.items():
        _chain_again(session, table, key, since)
    _keep_newest(session, telemetry, newest)


def run_on(running: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """The running sums of a bucket whose own counters are `own`, the bucket before it
    having `running` (empty for the first)."""
    return {name: running.get(name, 0) + own[name] for name in SUMMED}


def chained(
    base: Mapping[str, float], buckets: Iterable[Mapping[str, float]]
) -> list[dict[str, float]]:
    """The running sums of `buckets` (own counters, oldest first) after a bucket whose
    running sums are `base`."""
    running: Mapping[str, float] = base
    out = []
    for own in buckets:
        running = run_on(running, own)
        out.append(running)
    return out


def _bucket_values(aggregate: TelemetryAggregate) -> dict[str, Any]:
    """The columns of a `TelemetryBucket` row that an aggregate holds (not the running sums)."""
    values: dict[str, Any] = aggregate.counters()
    values["latency"] = aggregate.latency
    values["bins"] = aggregate.bins
    return values


def _by_key(
    telemetry: Mapping[BucketKey, TelemetryAggregate],
) -> dict[Key, list[tuple[dt.datetime, TelemetryAggregate]]]:
    """The aggregates per device, bundle name and version, oldest bucket first."""
    grouped: dict[Key, list[tuple[dt.datetime, TelemetryAggregate]]] = {}
    for key, aggregate in sorted(telemetry.items(), key=lambda item: item[0]):
        grouped.setdefault(key[:3], []).append((key[3], aggregate))
    return grouped


def _stored(
    session: Session, table: Table, devices: list[str], starts: list[dt.datetime], lock: bool
) -> dict[BucketKey, Any]:
    """The stored buckets of `devices` at `starts`."""
    found: dict[BucketKey, Any] = {}
    for chunk in in_chunks(devices):
        query = (
            select(table)
            .where(table.c.device_id.in_(chunk))
            .where(table.c.bucket_start.in_(starts))
            .order_by(table.c.id)
        )
        if lock:
            # FOR NO KEY UPDATE: ingestion changes no key, so a rollout inserting a
            # member row (FOR KEY SHARE on its device, the foreign key) need not wait.
            query = query.with_for_update(key_share=True)
        for row in session.execute(query):
            key = (row.device_id, row.bundle_name, row.bundle_version, as_utc(row.bucket_start))
            found[key] = row
    return found


def _newest(
    session: Session, devices: list[str]
) -> dict[Key, tuple[dt.datetime, dict[str, float]]]:
    """Per device, bundle name and version of `devices`: the newest bucket's start and
    running sums (by counter name)."""
    bucket = TelemetryBucket
    columns = [getattr(bucket, RUNNING[name]) for name in SUMMED]
    newest: dict[Key, tuple[dt.datetime, dict[str, float]]] = {}
    for chunk in in_chunks(devices):
        rows = session.execute(
            select(
                TelemetryLatest.device_id,
                TelemetryLatest.bundle_name,
                TelemetryLatest.bundle_version,
                TelemetryLatest.bucket_start,
                *columns,
            )
            .outerjoin(
                bucket,
                and_(
                    bucket.device_id == TelemetryLatest.device_id,
                    bucket.bundle_name == TelemetryLatest.bundle_name,
                    bucket.bundle_version == TelemetryLatest.bundle_version,
                    bucket.bucket_start == TelemetryLatest.bucket_start,
                ),
            )
            .where(TelemetryLatest.device_id.in_(chunk))
        ).all()
        for device_id, name, version, start, *running in rows:
            newest[(device_id, name, version)] = (
                as_utc(start),
                {counter: value or 0 for counter, value in zip(SUMMED, running, strict=True)},
            )
    return newest


def _chain_again(session: Session, table: Table, key: Key, since: dt.datetime) -> None:
    """Compute the running sums of `key`'s buckets from `since` on again, from the bucket
    before `since` (none: from zero)."""
    of_key = and_(
        table.c.device_id == key[0],
        table.c.bundle_name == key[1],
        table.c.bundle_version == key[2],
    )
    before = session.execute(
        select(*(table.c[RUNNING[name]] for name in SUMMED))
        .where(of_key, table.c.bucket_start < since)
        .order_by(table.c.bucket_start.desc())
        .limit(1)
    ).first()
    base = {} if before is None else dict(zip(SUMMED, before, strict=True))
    rows = session.execute(
        select(table.c.id, *(table.c[name] for name in SUMMED))
        .where(of_key, table.c.bucket_start >= since)
        .order_by(table.c.bucket_start)
    ).all()
    owns = [dict(zip(SUMMED, row[1:], strict=True)) for row in rows]
    session.execute(
        update(table).where(table.c.id == bindparam("bucket_id")),
        [
            {"bucket_id": row.id, **{RUNNING[name]: running[name] for name in SUMMED}}
            for row, running in zip(rows, chained(base, owns), strict=True)
        ],
    )


def _keep_newest(
    session: Session,
    telemetry: Mapping[BucketKey, TelemetryAggregate],
    newest: Mapping[Key, tuple[dt.datetime, dict[str, float]]],
) -> None:
    """Point `TelemetryLatest` at each key's newest bucket, the batch's included."""
    latest: dict[Key, dt.datetime] = {}
    for key in telemetry:
        latest[key[:3]] = max(key[3], latest.get(key[:3], key[3]))
    added = [key for key in latest if key not in newest]
    moved = [key for key, start in latest.items() if key in newest and start > newest[key][0]]
    if added:
        session.execute(
            insert(TelemetryLatest),
            [
                {
                    "device_id": key[0],
                    "bundle_name": key[1],
                    "bundle_version": key[2],
                    "bucket_start": latest[key],
                }
                for key in added
            ],
        )
    if moved:
        table = cast(Table, TelemetryLatest.__table__)
        session.execute(
            update(table).where(
                table.c.device_id == bindparam("key_device"),
                table.c.bundle_name == bindparam("key_name"),
                table.c.bundle_version == bindparam("key_version"),
            ),
            [
                {
                    "key_device": key[0],
                    "key_name": key[1],
                    "key_version": key[2],
                    "bucket_start": latest[key],
                }
                for key in moved
            ],
        )
