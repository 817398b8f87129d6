"""Running sums of telemetry buckets: kept by every write, in order or replayed, and read
back over any span as the buckets themselves add up (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import JSON, and_, column, insert, select, table

from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import alembic_config, upgrade_database
from edgefleet.server.db.models import TelemetryBucket, TelemetryLatest, UtcDateTime
from edgefleet.server.mqtt.aggregate import TelemetryAggregate
from edgefleet.server.mqtt.buckets import BucketKey, store_buckets
from edgefleet.server.mqtt.retention import apply_retention
from edgefleet.server.settings import ServerSettings
from edgefleet.server.spans import RUNNING, SUMMED, SpanSums, span_sums
from tests.server.rolloutsim import START, add_device

BUCKET = dt.timedelta(minutes=5)
KEYS = [(device, "demo", version) for device in ("d1", "d2") for version in ("1.0.0", "2.0.0")]
TIMES = [START + BUCKET * i for i in range(12)]


def keeping(retention: dt.timedelta) -> ServerSettings:
    """Settings whose retention keeps telemetry this long."""
    return ServerSettings(
        data_dir=Path("."),
        trust_path=Path("t.json"),
        server_key_path=Path("k"),
        telemetry_retention=retention,
    )


def random_aggregate(rng: random.Random) -> TelemetryAggregate:
    requests = rng.randrange(0, 50)
    labelled = rng.randrange(0, 5)
    return TelemetryAggregate(
        windows=1,
        requests=requests,
        errors=rng.randrange(0, requests + 1),
        fallbacks=rng.randrange(0, 3),
        shadow_requests=rng.randrange(0, 4),
        shadow_agreements=rng.randrange(0, 2),
        labelled_count=labelled,
        labelled_correct=rng.randrange(0, labelled + 1),
        labelled_abs_error=rng.random(),
        labelled_squared_error=rng.random(),
    )


def stored_buckets(db: Database) -> list[Any]:
    with db.session() as session:
        return list(
            session.execute(
                select(TelemetryBucket).order_by(
                    TelemetryBucket.device_id,
                    TelemetryBucket.bundle_name,
                    TelemetryBucket.bundle_version,
                    TelemetryBucket.bucket_start,
                )
            ).scalars()
        )


def assert_running_sums_hold(db: Database) -> None:
    """Every bucket's running sums are its own counters added to the bucket before it, and
    `TelemetryLatest` names each device and version's newest bucket."""
    newest: dict[tuple[str, str, str], dt.datetime] = {}
    running: dict[tuple[str, str, str], dict[str, float]] = {}
    for bucket in stored_buckets(db):
        key = (bucket.device_id, bucket.bundle_name, bucket.bundle_version)
        before = running.get(key, dict.fromkeys(SUMMED, 0))
        expected = {name: before[name] + getattr(bucket, name) for name in SUMMED}
        for name in SUMMED:
            assert getattr(bucket, RUNNING[name]) == approx(expected[name]), (key, name)
        running[key] = expected
        newest[key] = bucket.bucket_start
    with db.session() as session:
        latest = {
            (row.device_id, row.bundle_name, row.bundle_version): row.bucket_start
            for row in session.scalars(select(TelemetryLatest))
        }
    assert latest == newest


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def added_up(
    db: Database, key: tuple[str, str, str], lo: dt.datetime, hi: dt.datetime
) -> dict[str, float]:
    """`SUMMED` over `key`'s buckets with lo <= start < hi, by adding them up."""
    sums = dict.fromkeys(SUMMED, 0.0)
    for bucket in stored_buckets(db):
        if (bucket.device_id, bucket.bundle_name, bucket.bundle_version) == key and (
            lo <= bucket.bucket_start < hi
        ):
            for name in SUMMED:
                sums[name] += getattr(bucket, name)
    return sums


def spanned(db: Database, key: tuple[str, str, str], lo: dt.datetime, hi: dt.datetime) -> SpanSums:
    with db.session() as session:
        return span_sums(
            session,
            and_(
                TelemetryLatest.device_id == key[0],
                TelemetryLatest.bundle_name == key[1],
                TelemetryLatest.bundle_version == key[2],
            ),
            first=lambda start: start >= lo,
            last=lambda start: start < hi,
        )


def test_running_sums_hold_through_merges_replays_and_retention(database: Database) -> None:
    for device in ("d1", "d2"):
        add_device(database, device)
    rng = random.Random(7)
    replayed = 0
    for flush in range(40):
        # Mostly the newest buckets, sometimes older ones: a device's outbox replayed.
        newest = min(len(TIMES) - 1, 2 + flush // 4)
        telemetry: dict[BucketKey, TelemetryAggregate] = {}
        for key in rng.sample(KEYS, rng.randrange(1, len(KEYS) + 1)):
            for start in rng.sample(TIMES[: newest + 1], rng.randrange(1, 3)):
                replayed += start < TIMES[max(0, newest - 1)]
                telemetry[(key[0], key[1], key[2], start)] = random_aggregate(rng)
        with database.session() as session:
            store_buckets(session, telemetry, lock=database.engine.dialect.name != "sqlite")
        assert_running_sums_hold(database)
    assert replayed > 10  # the replayed path was taken, not only appends

    for key in KEYS:
        for lo, hi in ((TIMES[0], TIMES[-1] + BUCKET), (TIMES[3], TIMES[8]), (TIMES[5], TIMES[6])):
            expected = added_up(database, key, lo, hi)
            got = spanned(database, key, lo, hi)
            assert {name: got.sums[name] for name in SUMMED} == {
                name: approx(value) for name, value in expected.items()
            }
            assert got.active == (1 if expected["requests"] > 0 else 0)
    assert spanned(database, KEYS[0], TIMES[-1] + BUCKET, TIMES[-1] + 2 * BUCKET).sums == (
        dict.fromkeys(SUMMED, 0)
    )

    # Retention deletes the oldest buckets: the spans over what is left still add up.
    with database.session() as session:
        apply_retention(session, keeping(dt.timedelta(minutes=22)), TIMES[8])
    assert min(b.bucket_start for b in stored_buckets(database)) == TIMES[4]
    assert_running_sums_hold_over_what_is_left(database)


def assert_running_sums_hold_over_what_is_left(db: Database) -> None:
    """After retention, running sums differ by the buckets' own counters (the first keeps
    what the deleted ones added)."""
    previous: dict[tuple[str, str, str], Any] = {}
    for bucket in stored_buckets(db):
        key = (bucket.device_id, bucket.bundle_name, bucket.bundle_version)
        before = previous.get(key)
        if before is not None:
            for name in SUMMED:
                assert getattr(bucket, RUNNING[name]) - getattr(before, RUNNING[name]) == approx(
                    getattr(bucket, name)
                )
        previous[key] = bucket
    for key in KEYS:
        got = spanned(db, key, TIMES[0], TIMES[-1] + BUCKET)
        expected = added_up(db, key, TIMES[0], TIMES[-1] + BUCKET)
        assert got.sums == {name: approx(value) for name, value in expected.items()}


def test_a_version_whose_buckets_retention_deleted_starts_its_sums_again(
    database: Database,
) -> None:
    add_device(database, "d1")
    lock = database.engine.dialect.name != "sqlite"
    with database.session() as session:
        store_buckets(
            session, {("d1", "demo", "1.0.0", TIMES[0]): TelemetryAggregate(requests=7)}, lock=lock
        )
    with database.session() as session:
        apply_retention(session, keeping(dt.timedelta(minutes=5)), TIMES[3])
        assert session.scalars(select(TelemetryLatest)).all() == []
    with database.session() as session:
        store_buckets(
            session, {("d1", "demo", "1.0.0", TIMES[4]): TelemetryAggregate(requests=3)}, lock=lock
        )
    (bucket,) = stored_buckets(database)
    assert (bucket.requests, bucket.running_requests) == (3, 3)
    assert_running_sums_hold(database)


def test_the_migration_gives_stored_buckets_their_running_sums(database: Database) -> None:
    add_device(database, "d1")
    names = (
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
    before_0010 = table(  # the buckets' columns as migration 0009 left them
        "telemetry_buckets",
        column("device_id"),
        column("bundle_name"),
        column("bundle_version"),
        column("bucket_start", UtcDateTime()),
        column("labelled_abs_error"),
        column("labelled_squared_error"),
        column("latency", JSON()),
        column("bins", JSON()),
        *(column(name) for name in names),
    )
    with database.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0009")
        conn.execute(
            insert(before_0010),
            [
                {
                    "device_id": "d1",
                    "bundle_name": "demo",
                    "bundle_version": version,
                    "bucket_start": TIMES[2 - index],  # stored newest first
                    "labelled_abs_error": 0.5,
                    "labelled_squared_error": 0.25,
                    "latency": {},
                    "bins": {},
                    **dict.fromkeys(names, 1),
                    "requests": requests,
                }
                for index, requests in enumerate((5, 7, 11))
                for version in ("1.0.0", "2.0.0")
            ],
        )
    upgrade_database(database)
    assert_running_sums_hold(database)
    by_start = {b.bucket_start: b for b in stored_buckets(database) if b.bundle_version == "1.0.0"}
    assert [by_start[t].running_requests for t in TIMES[:3]] == [11, 18, 23]
