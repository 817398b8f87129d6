"""Heartbeat history and presence changes on a real database: every heartbeat merged
into its slot, downsampled with age without losing an average or a maximum, deleted
after retention; replicas merging at once lose nothing; a presence change per change."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from edgefleet.mqtt.messages import Presence
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import HeartbeatSample, PresenceChange
from edgefleet.server.history import (
    MAX_POINTS,
    HeartbeatSlot,
    heartbeat_series,
    merge_heartbeat_slots,
    point_resolution,
    presence_history,
    slot_start,
)
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.mqtt.retention import apply_retention
from tests.server.fleet import SimDevice
from tests.server.test_ingest import T0, Clock, Keys, enroll, heartbeat, make_settings, signed


def beat(ingestor: Ingestor, device: SimDevice, **fields: object) -> None:
    ingestor.handle(*signed(device, TopicKind.HEARTBEAT, heartbeat(device, **fields)))


def rows(db: Database) -> list[tuple[str, dt.datetime, int, int, float, float, int]]:
    with db.session() as session:
        found = session.execute(
            select(
                HeartbeatSample.device_id,
                HeartbeatSample.slot_start,
                HeartbeatSample.resolution_s,
                HeartbeatSample.samples,
                HeartbeatSample.cpu_sum,
                HeartbeatSample.cpu_max,
                HeartbeatSample.disk_free_min,
            ).order_by(HeartbeatSample.device_id, HeartbeatSample.slot_start)
        )
        return [tuple(row) for row in found]  # type: ignore[misc]


def test_every_heartbeat_is_merged_into_its_minute_slot(database: Database, tmp_path: Path) -> None:
    dev = SimDevice("dev-0")
    enroll(database, [dev])
    clock = Clock(T0 + dt.timedelta(seconds=5))
    ingestor = Ingestor(database, Keys([dev]), make_settings(tmp_path), clock=clock)
    beat(ingestor, dev, cpu_percent=10.0, disk_free_bytes=900, disk_total_bytes=1000)
    beat(ingestor, dev, cpu_percent=40.0, disk_free_bytes=700, disk_total_bytes=1000)
    ingestor.flush()
    clock.now = T0 + dt.timedelta(seconds=50)  # the same minute, another flush
    beat(ingestor, dev, cpu_percent=25.0, disk_free_bytes=800, disk_total_bytes=1000)
    ingestor.flush()
    clock.now = T0 + dt.timedelta(seconds=65)  # the next minute
    beat(ingestor, dev, cpu_percent=5.0, temperature_c=61.5)
    ingestor.flush()
    assert rows(database) == [
        (dev.id, T0, 60, 3, 75.0, 40.0, 700),
        (dev.id, T0 + dt.timedelta(minutes=1), 60, 1, 5.0, 5.0, 1),
    ]
    with database.session() as session:
        points = heartbeat_series(session, dev.id, T0, T0 + dt.timedelta(minutes=2))
    assert [(p.samples, p.cpu_avg, p.cpu_max, p.temperature_max) for p in points] == [
        (3, 25.0, 40.0, None),
        (1, 5.0, 5.0, 61.5),
    ]
    assert points[0].temperature_avg is None and points[1].temperature_avg == 61.5


def test_two_replicas_merging_the_same_slot_at_once_lose_nothing(
    database: Database, tmp_path: Path
) -> None:
    devices = [SimDevice(f"dev-{i}") for i in range(3)]
    enroll(database, devices)
    replicas = [
        Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock(T0))
        for _ in range(2)
    ]
    for i, replica in enumerate(replicas):
        for dev in devices:
            for cpu in (10.0 * (i + 1), 30.0 * (i + 1)):
                beat(replica, dev, cpu_percent=cpu)
    barrier = threading.Barrier(2)

    def flush(replica: Ingestor) -> None:
        barrier.wait()
        replica.flush()

    threads = [threading.Thread(target=flush, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(not r._pending for r in replicas)
    assert rows(database) == [(dev.id, T0, 60, 4, 120.0, 60.0, 1) for dev in devices]


def _slot(cpu: float, disk_free: int, temperature: float | None = None) -> HeartbeatSlot:
    slot = HeartbeatSlot()
    slot.merge(
        HeartbeatSlot(
            samples=1,
            cpu_sum=cpu,
            cpu_max=cpu,
            memory_used_sum=100.0,
            memory_total=1000,
            disk_free_min=disk_free,
            disk_total=10_000,
            temperature_samples=0 if temperature is None else 1,
            temperature_sum=temperature or 0.0,
            temperature_max=temperature,
        )
    )
    return slot


def test_downsampling_keeps_averages_and_extremes_exact_and_retention_deletes(
    database: Database, tmp_path: Path
) -> None:
    dev = SimDevice("dev-0")
    enroll(database, [dev])
    now = T0
    day_old = slot_start(now - dt.timedelta(hours=30), 3600)  # an hour boundary, 30 h ago
    week_old = slot_start(now - dt.timedelta(days=8), 3600)
    month_old = now - dt.timedelta(days=31)
    fine = {
        # Three minutes of one 15-minute slot, 30 h ago; one of the next slot.
        (dev.id, day_old): _slot(10.0, 500, 50.0),
        (dev.id, day_old + dt.timedelta(minutes=1)): _slot(20.0, 400),
        (dev.id, day_old + dt.timedelta(minutes=14)): _slot(60.0, 600, 70.0),
        (dev.id, day_old + dt.timedelta(minutes=15)): _slot(5.0, 900),
        # Eight days ago: minutes of one hour, reaching 1-hour slots in one step.
        (dev.id, week_old + dt.timedelta(minutes=3)): _slot(30.0, 300),
        (dev.id, week_old + dt.timedelta(minutes=47)): _slot(50.0, 200, 80.0),
        (dev.id, slot_start(month_old, 60)): _slot(99.0, 1),
        (dev.id, slot_start(now, 60)): _slot(1.0, 1000),  # the current minute: left alone
    }
    settings = make_settings(tmp_path)  # telemetry_retention: 30 days
    with database.session() as session:
        merge_heartbeat_slots(session, fine, lock=not database.is_sqlite)
        session.add(PresenceChange(device_id=dev.id, at=month_old, online=True, reason="x"))
    with database.session() as session:
        result = apply_retention(session, settings, now)
    assert result.heartbeat_rows_deleted == 1 and result.presence_changes_deleted == 1
    # 6 minutes into 15-minute slots, then the week-old two of those into one hour
    assert result.heartbeat_rows_merged == 6 + 2
    assert rows(database) == [
        (dev.id, week_old, 3600, 2, 80.0, 50.0, 200),
        (dev.id, day_old, 900, 3, 90.0, 60.0, 400),
        (dev.id, day_old + dt.timedelta(minutes=15), 900, 1, 5.0, 5.0, 900),
        (dev.id, slot_start(now, 60), 60, 1, 1.0, 1.0, 1000),
    ]
    with database.session() as session:
        points = heartbeat_series(session, dev.id, day_old, day_old + dt.timedelta(hours=1))
        week = heartbeat_series(session, dev.id, week_old, week_old + dt.timedelta(hours=1))
    assert (points[0].resolution_s, points[0].cpu_avg, points[0].cpu_max) == (900, 30.0, 60.0)
    assert (points[0].temperature_avg, points[0].temperature_max) == (60.0, 70.0)
    assert (week[0].resolution_s, week[0].cpu_avg, week[0].temperature_max) == (3600, 40.0, 80.0)
    with database.session() as session:  # a second step finds nothing more to do
        again = apply_retention(session, settings, now)
    assert again.heartbeat_rows_merged == 0 and len(rows(database)) == 4


def test_two_replicas_downsampling_at_once_merge_each_row_once(
    database: Database, tmp_path: Path
) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time: one server process")
    devices = [SimDevice(f"dev-{i}") for i in range(3)]
    enroll(database, devices)
    base = slot_start(T0 - dt.timedelta(hours=30), 3600)
    with database.session() as session:
        merge_heartbeat_slots(
            session,
            {
                (dev.id, base + dt.timedelta(minutes=m)): _slot(float(m), 100)
                for dev in devices
                for m in range(30)
            },
            lock=True,
        )
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def retention() -> None:
        barrier.wait()
        try:
            with database.session() as session:
                apply_retention(session, make_settings(tmp_path), T0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=retention) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with database.session() as session:
        totals = session.execute(
            select(HeartbeatSample.device_id, func.sum(HeartbeatSample.samples))
            .group_by(HeartbeatSample.device_id)
            .order_by(HeartbeatSample.device_id)
        ).all()
        resolutions = set(session.scalars(select(HeartbeatSample.resolution_s)))
    assert [tuple(t) for t in totals] == [(dev.id, 30) for dev in devices]
    assert resolutions == {900}


def test_a_history_holds_at_most_max_points(sqlite_database: Database) -> None:
    assert point_resolution(T0, T0 + dt.timedelta(hours=24)) == 60
    assert point_resolution(T0, T0 + dt.timedelta(days=2)) == 300
    assert point_resolution(T0, T0 + dt.timedelta(days=30)) == 3600
    dev = SimDevice("dev-0")
    enroll(sqlite_database, [dev])
    minutes = 3 * 24 * 60
    with sqlite_database.session() as session:
        merge_heartbeat_slots(
            session,
            {(dev.id, T0 + dt.timedelta(minutes=m)): _slot(m % 7, 100) for m in range(minutes)},
            lock=False,
        )
    with sqlite_database.session() as session:
        points = heartbeat_series(session, dev.id, T0, T0 + dt.timedelta(minutes=minutes))
    # 4320 minutes in 5-minute points: 864 of them, each of five heartbeats
    assert len(points) == 864 <= MAX_POINTS and {p.resolution_s for p in points} == {300}
    assert {p.samples for p in points} == {5}
    assert sum(p.samples for p in points) == minutes
    assert max(p.cpu_max for p in points) == 6.0


def test_presence_changes_are_recorded_with_their_reason_once_per_change(
    database: Database, tmp_path: Path
) -> None:
    dev = SimDevice("dev-0")
    enroll(database, [dev])
    clock = Clock(T0)
    settings = make_settings(tmp_path, offline_after=dt.timedelta(seconds=120))
    ingestor = Ingestor(database, Keys([dev]), settings, clock=clock)
    presence = DeviceTopics(dev.id).presence

    def step(payload: bytes | None = None) -> None:
        clock.now += dt.timedelta(seconds=10)
        if payload is None:
            beat(ingestor, dev)
        else:
            ingestor.handle(presence, payload)
        ingestor.flush()

    step(Presence.ONLINE.payload)
    step()  # a heartbeat while online: no change
    step(Presence.OFFLINE_CLEAN.payload)
    step(Presence.OFFLINE.payload)  # offline already: no change
    step(Presence.ONLINE.payload)
    step(Presence.OFFLINE.payload)
    step()  # a signed message while offline: the device is back
    with database.session() as session:  # silent since: the sweep marks it offline
        apply_retention(session, settings, clock.now + dt.timedelta(minutes=5))
    with database.session() as session:
        apply_retention(session, settings, clock.now + dt.timedelta(minutes=6))  # no change
    with database.session() as session:
        changes = [(c.online, c.reason) for c in presence_history(session, dev.id, T0)]
        assert presence_history(session, dev.id, T0 + dt.timedelta(seconds=65))[0].reason == (
            "reporting again"
        )
    assert changes == [
        (True, "connected"),
        (False, "disconnected cleanly"),
        (True, "connected"),
        (False, "connection lost (last will)"),
        (True, "reporting again"),
        (False, "no heartbeat for 120 s"),
    ]
