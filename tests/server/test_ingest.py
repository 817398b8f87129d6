"""Ingestion on a real database: signatures checked, state written in batches, nothing twice."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from edgefleet.mqtt.devicesig import DeviceKey, sign_device_payload
from edgefleet.mqtt.messages import Heartbeat, StatusReport, encode_message
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    Base,
    Device,
    StatusReportRow,
    TelemetryBucket,
    TelemetryLatest,
)
from edgefleet.server.devices import DeviceKeyCache, remove_device
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.mqtt.retention import apply_retention
from edgefleet.server.principals import Principal, Role
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import format_time
from tests.server.fleet import SimDevice, telemetry_window

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


class Clock:
    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


class Keys:
    """The ingestor's key lookup, from a dict (H5's DeviceKeyCache does it from the DB)."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.keys = {device.id: device.public_key for device in devices}
        self.lookups = 0  # fresh lookups

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None:
        self.lookups += int(fresh)
        return self.keys.get(device_id)


def make_settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path,
        trust_path=tmp_path / "t.json",
        server_key_path=tmp_path / "k",
        **overrides,
    )


def enroll(db: Database, devices: list[SimDevice]) -> None:
    with db.session() as session:
        for device in devices:
            session.add(
                Device(
                    id=device.id,
                    public_key=device.public_key,
                    enrolled_at=T0,
                    profile=device.profile,
                    arch="x86_64",
                    runtimes=["onnxruntime"],
                    agent_version="0.1.0",
                    tags={},
                    online=False,
                    health="unknown",
                    status_sequence=0,
                    directive_sequence=0,
                )
            )


def signed(device: SimDevice, kind: TopicKind, message: bytes) -> tuple[str, bytes]:
    topic = DeviceTopics(device.id).topic(kind)
    return topic, sign_device_payload(topic, message, device.key)


def heartbeat(device: SimDevice, **fields: object) -> bytes:
    values: dict[str, object] = {
        "device_id": device.id,
        "sent_at": format_time(T0),
        "uptime_s": 5,
        "cpu_percent": 3.0,
        "memory_used_bytes": 1,
        "memory_total_bytes": 2,
        "disk_free_bytes": 1,
        "disk_total_bytes": 2,
        "agent_version": "0.2.0",
        "install_state": "idle",
    }
    values.update(fields)
    return encode_message(Heartbeat(**values))  # type: ignore[arg-type]


def status(device: SimDevice, sequence: int, state: str, **fields: object) -> bytes:
    values: dict[str, object] = {
        "device_id": device.id,
        "sent_at": format_time(T0),
        "sequence": sequence,
        "install_state": state,
    }
    values.update(fields)
    return encode_message(StatusReport(**values))  # type: ignore[arg-type]


def telemetry(device: SimDevice, start: dt.datetime, **fields: object) -> bytes:
    return encode_message(telemetry_window(device.id, start, **fields))  # type: ignore[arg-type]


@pytest.fixture
def devices() -> list[SimDevice]:
    return [SimDevice(f"dev-{i}") for i in range(3)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ingestor(
    database: Database, devices: list[SimDevice], tmp_path: Path, clock: Clock
) -> Ingestor:
    enroll(database, devices)
    return Ingestor(database, Keys(devices), make_settings(tmp_path), clock=clock)


def device_row(db: Database, device_id: str) -> Device:
    with db.session() as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device


def test_heartbeats_coalesce_and_update_the_device(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, uptime_s=1)))
    ingestor.handle(
        *signed(
            dev,
            TopicKind.HEARTBEAT,
            heartbeat(
                dev, uptime_s=2, model_name="demo", model_version="1.0.0", install_state="committed"
            ),
        )
    )
    assert ingestor.flush() == 2
    row = device_row(database, dev.id)
    assert row.online and row.last_seen == T0
    assert row.heartbeat is not None and row.heartbeat["uptime_s"] == 2
    assert (row.agent_version, row.model_name, row.model_version) == ("0.2.0", "demo", "1.0.0")
    assert row.install_state == "committed"
    assert ingestor.counts["heartbeat"] == 2


def test_an_older_heartbeat_after_a_newer_one_changes_nothing(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    new = heartbeat(
        dev,
        sent_at=format_time(T0 + dt.timedelta(seconds=60)),
        uptime_s=60,
        model_name="demo",
        model_version="2.0.0",
        install_state="committed",
    )
    old = heartbeat(
        dev, uptime_s=1, model_name="demo", model_version="1.0.0", install_state="idle"
    )  # sent at T0: a replay, or a copy another replica flushes late
    # within one batch: the newer one arrives first
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, new))
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, old))
    ingestor.flush()
    row = device_row(database, dev.id)
    assert (row.model_version, row.install_state) == ("2.0.0", "committed")
    assert row.heartbeat is not None and row.heartbeat["uptime_s"] == 60
    # against the stored row: the older one in a batch of its own
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, old))
    ingestor.flush()
    again = device_row(database, dev.id)
    assert (again.model_version, again.install_state, again.heartbeat) == (
        "2.0.0",
        "committed",
        row.heartbeat,
    )
    # one sent in the same second as the stored one is applied (whole seconds)
    same_second = heartbeat(
        dev, sent_at=format_time(T0 + dt.timedelta(seconds=60)), install_state="downloading"
    )
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, same_second))
    ingestor.flush()
    assert device_row(database, dev.id).install_state == "downloading"


def test_messages_dated_ahead_are_refused_and_do_not_block_the_next_honest_one(
    ingestor: Ingestor,
    database: Database,
    devices: list[SimDevice],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = devices[0]
    tomorrow = format_time(T0 + dt.timedelta(days=1))
    pinned = {"model_name": "demo", "model_version": "6.6.6", "install_state": "committed"}
    with caplog.at_level(logging.WARNING, logger="edgefleet.server.mqtt.ingest"):
        ingestor.handle(
            *signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, sent_at=tomorrow, **pinned))
        )
        ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, sent_at=tomorrow)))
        report = status(dev, 1, "committed", sent_at=tomorrow, bundle_version="6.6.6")
        ingestor.handle(*signed(dev, TopicKind.STATUS, report))
        window = telemetry(dev, T0 + dt.timedelta(minutes=5))  # ends 6 minutes ahead
        ingestor.handle(*signed(dev, TopicKind.TELEMETRY, window))
        other = devices[1]
        ingestor.handle(*signed(other, TopicKind.HEARTBEAT, heartbeat(other, sent_at=tomorrow)))
    assert dict(ingestor.refused) == {"clock-ahead": 5}
    lines = [r.getMessage() for r in caplog.records if "clock-ahead" in r.getMessage()]
    # one line per device, not one per message
    assert len(lines) == 2 and dev.id in lines[0] and other.id in lines[1]
    assert ingestor.flush() == 0
    row = device_row(database, dev.id)
    assert row.heartbeat is None and row.status_sequence == 0 and not row.online

    # the honest heartbeat that follows is applied; so is one just within the tolerance
    honest = {"model_name": "demo", "model_version": "1.0.0", "install_state": "committed"}
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, **honest)))
    ingestor.flush()
    assert device_row(database, dev.id).model_version == "1.0.0"
    within = format_time(T0 + dt.timedelta(minutes=5))
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, sent_at=within, uptime_s=9)))
    ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, T0 + dt.timedelta(minutes=4))))
    assert ingestor.flush() == 2
    stored = device_row(database, dev.id).heartbeat
    assert stored is not None and stored["uptime_s"] == 9
    assert dict(ingestor.refused) == {"clock-ahead": 5}


def test_a_stored_heartbeat_dated_ahead_does_not_pin_the_device(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    # written before ingestion refused such dates: a heartbeat dated a day ahead
    ingestor.handle(
        *signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, model_version="6.6.6", model_name="demo"))
    )
    ingestor.flush()
    with database.session() as session:
        row = session.get(Device, dev.id)
        assert row is not None and row.heartbeat is not None
        row.heartbeat = {**row.heartbeat, "sent_at": format_time(T0 + dt.timedelta(days=1))}
    honest = heartbeat(
        dev,
        sent_at=format_time(T0 - dt.timedelta(minutes=1)),
        model_name="demo",
        model_version="1.0.0",
    )
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, honest))
    ingestor.flush()
    assert device_row(database, dev.id).model_version == "1.0.0"


def test_status_reports_are_deduplicated_applied_and_trimmed(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    enroll(database, devices)
    ingestor = Ingestor(
        database, Keys(devices), make_settings(tmp_path, status_reports_kept=3), clock=Clock()
    )
    dev = devices[0]
    common = {"bundle_name": "demo", "bundle_version": "2.0.0", "previous_version": "1.0.0"}
    for seq, state in enumerate(["downloading", "verifying", "activating", "committed"], 1):
        ingestor.handle(*signed(dev, TopicKind.STATUS, status(dev, seq, state, **common)))
    ingestor.handle(*signed(dev, TopicKind.STATUS, status(dev, 4, "committed", **common)))
    ingestor.handle(*signed(dev, TopicKind.STATUS, status(dev, 2, "verifying", **common)))
    ingestor.flush()
    assert ingestor.duplicates["status"] == 2
    row = device_row(database, dev.id)
    assert row.status_sequence == 4 and row.install_state == "committed"
    assert (row.model_name, row.model_version, row.previous_version) == ("demo", "2.0.0", "1.0.0")
    with database.session() as session:
        kept = session.scalars(
            select(StatusReportRow.sequence).where(StatusReportRow.device_id == dev.id)
        ).all()
    assert sorted(kept) == [2, 3, 4]

    # another replica (fresh memory) receives a redelivered report: the database decides
    again = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    again.handle(*signed(dev, TopicKind.STATUS, status(dev, 3, "activating", **common)))
    again.flush()
    assert again.duplicates["status"] == 1
    assert device_row(database, dev.id).install_state == "committed"


def test_status_reports_of_many_devices_are_trimmed_in_a_few_statements(
    database: Database, tmp_path: Path
) -> None:
    fleet = [SimDevice(f"dev-{i:03d}") for i in range(60)]
    enroll(database, fleet)
    settings = make_settings(tmp_path, status_reports_kept=2)
    ingestor = Ingestor(database, Keys(fleet), settings, clock=Clock())
    for device in fleet:
        for seq, state in enumerate(["downloading", "verifying", "activating"], 1):
            ingestor.handle(*signed(device, TopicKind.STATUS, status(device, seq, state)))
    deletes: list[str] = []

    def count_deletes(*args: Any) -> None:
        statement = str(args[2])
        if statement.lstrip().upper().startswith("DELETE FROM STATUS_REPORTS"):
            deletes.append(statement)

    event.listen(database.engine, "before_cursor_execute", count_deletes)
    try:
        ingestor.flush()
    finally:
        event.remove(database.engine, "before_cursor_execute", count_deletes)
    assert len(deletes) == 1  # one statement for the batch, not one per device
    with database.session() as session:
        kept = session.execute(select(StatusReportRow.device_id, StatusReportRow.sequence)).all()
    assert sorted(kept) == sorted((device.id, seq) for device in fleet for seq in (2, 3))


def test_a_shadow_commit_does_not_change_the_served_version(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    reason = "demo-2.0.0 runs in shadow beside demo-1.0.0: compared, never served"
    report = status(dev, 1, "committed", bundle_name="demo", bundle_version="2.0.0", reason=reason)
    ingestor.handle(*signed(dev, TopicKind.STATUS, report))
    ingestor.flush()
    row = device_row(database, dev.id)
    assert row.install_state == "committed" and row.model_version is None


def test_a_status_report_keeps_that_the_device_may_be_frozen_out(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    frozen = "the newest fleet timestamp expired at 2026-12-06T10:00:00Z"
    ingestor.handle(*signed(dev, TopicKind.STATUS, status(dev, 1, "idle", frozen_reason=frozen)))
    ingestor.flush()
    with database.session() as session:
        kept = session.scalars(
            select(StatusReportRow.frozen_reason).where(StatusReportRow.device_id == dev.id)
        ).all()
    assert kept == [frozen]


def test_telemetry_merges_into_buckets_across_flushes_once_per_window(
    ingestor: Ingestor, database: Database, devices: list[SimDevice], clock: Clock
) -> None:
    clock.now = T0 + dt.timedelta(hours=2)  # every window below is in the past
    dev = devices[0]
    for minute in range(3):
        start = T0 + dt.timedelta(minutes=minute)
        ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, start, errors=1)))
    ingestor.flush()
    # the same window again (redelivered) and one more
    ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, T0, errors=1)))
    later = T0 + dt.timedelta(minutes=3)
    ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, later, errors=30)))
    ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, T0 + dt.timedelta(hours=1))))
    ingestor.flush()
    assert ingestor.duplicates["telemetry"] == 1
    with database.session() as session:
        buckets = session.scalars(select(TelemetryBucket).order_by(TelemetryBucket.bucket_start))
        rows = [(b.bucket_start, b.windows, b.requests, b.errors) for b in buckets]
        first = session.scalars(select(TelemetryBucket)).first()
        assert first is not None
        assert sum(first.latency["counts"]) == 400
        assert first.bins["inputs"]["f1"]["counts"] == [40] * 10
    assert rows == [(T0, 4, 400, 33), (T0 + dt.timedelta(hours=1), 1, 100, 0)]
    # the last hour (the window an hour later, 0 errors) decides the health
    assert device_row(database, dev.id).health == "ok"


def test_health_judges_the_last_hour_not_the_newest_window(
    ingestor: Ingestor, database: Database, devices: list[SimDevice], clock: Clock
) -> None:
    """A failing device stays failing through a quiet window: the hour decides."""
    dev = devices[1]

    def send(minute: int, **fields: int) -> str:
        clock.now = T0 + dt.timedelta(minutes=minute, seconds=60)
        start = T0 + dt.timedelta(minutes=minute)
        ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, start, **fields)))
        ingestor.flush()
        return device_row(database, dev.id).health

    assert send(0, requests=1000, fallbacks=990) == "failing"
    # a quiet window of a few answered requests (its own rate 0%): the hour is still 99%
    assert send(10, requests=20) == "failing"
    assert send(20, requests=5) == "failing"
    # 100 more requests, 10 fallen back: 1000 of 1125 in the hour
    assert send(30, requests=100, fallbacks=10) == "failing"
    # an hour after the failures: 20 fallbacks of 200 requests (10%)
    assert send(65, requests=75, fallbacks=10) == "degraded"
    # the hour after that holds only answered requests, then none at all
    assert send(100, requests=500) == "ok"
    assert send(170, requests=0) == "unknown"


def test_health_is_weighed_by_the_requests_of_the_hour(
    ingestor: Ingestor, database: Database, devices: list[SimDevice], clock: Clock
) -> None:
    dev = devices[2]
    windows = [
        (0, 500, 1, "ok"),  # one failure among many
        (70, 1, 1, "ok"),  # one failed batch in a quiet hour: not a failing device
        (140, 5, 5, "failing"),  # 5 failures of 5 (25% of at least 20)
    ]
    for minute, requests, errors, health in windows:
        clock.now = T0 + dt.timedelta(minutes=minute, seconds=60)
        start = T0 + dt.timedelta(minutes=minute)
        window = telemetry(dev, start, requests=requests, errors=errors)
        ingestor.handle(*signed(dev, TopicKind.TELEMETRY, window))
        ingestor.flush()
        assert device_row(database, dev.id).health == health


def test_presence_sets_online_and_offline(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    presence = DeviceTopics(dev.id).presence
    ingestor.handle(presence, b"online")
    ingestor.flush()
    assert device_row(database, dev.id).online
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev)))
    ingestor.handle(presence, b"offline")  # after the heartbeat: offline wins
    ingestor.flush()
    assert not device_row(database, dev.id).online


def test_refusals_are_counted_by_reason_and_change_nothing(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev, other = devices[0], devices[1]
    stranger = SimDevice("stranger")
    hb = heartbeat(dev)
    topic = DeviceTopics(dev.id).heartbeat
    cases: list[tuple[str, bytes]] = [
        signed(stranger, TopicKind.HEARTBEAT, heartbeat(stranger)),  # unknown-device
        (topic, sign_device_payload(topic, hb, DeviceKey.generate())),  # device-signature
        (topic, hb),  # unsigned: device-signature
        # signed for another topic (telemetry) and moved: device-signature
        (topic, signed(dev, TopicKind.TELEMETRY, hb)[1]),
        # the other device's valid frame replayed into this device's subtree
        (topic, signed(other, TopicKind.HEARTBEAT, heartbeat(other))[1]),
        signed(dev, TopicKind.HEARTBEAT, b"{not json"),  # malformed
        signed(dev, TopicKind.HEARTBEAT, heartbeat(other)),  # names another device: malformed
        signed(dev, TopicKind.STATUS, hb),  # a heartbeat on the status topic: malformed
        ("edgefleet/v1/devices/x/unknown", hb),  # bad-topic
        ("elsewhere/x", hb),  # bad-topic
        (DeviceTopics(dev.id).presence, b"maybe"),  # malformed presence
    ]
    for case_topic, payload in cases:
        ingestor.handle(case_topic, payload)
    assert dict(ingestor.refused) == {
        "unknown-device": 1,
        "device-signature": 4,
        "malformed": 4,
        "bad-topic": 2,
    }
    assert ingestor.flush() == 0
    row = device_row(database, dev.id)
    assert not row.online and row.heartbeat is None


def test_block_requests_go_verified_and_unwrapped_to_the_block_service(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    enroll(database, devices)
    calls: list[tuple[str, bytes]] = []
    ingestor = Ingestor(
        database,
        Keys(devices),
        make_settings(tmp_path),
        blocks=lambda topic, payload: calls.append((topic, payload)),
    )
    dev = devices[0]
    ingestor.handle(*signed(dev, TopicKind.BLOCKS_REQUEST, b'{"request": 1}'))
    topic = DeviceTopics(dev.id).blocks_request
    ingestor.handle(topic, b'{"unsigned": 1}')
    assert calls == [(topic, b'{"request": 1}')]
    assert ingestor.refused["device-signature"] == 1


def test_handle_never_raises_on_garbage(ingestor: Ingestor, devices: list[SimDevice]) -> None:
    topic = DeviceTopics(devices[0].id).telemetry
    for payload in (b"", b"EFS1 ", b"EFS1 " + b"0" * 128 + b"\n", bytes(range(256)) * 10):
        ingestor.handle(topic, payload)
    ingestor.handle("", b"")
    assert sum(ingestor.refused.values()) == 5


def test_a_failed_flush_keeps_the_batch_for_the_next(
    tmp_path: Path, devices: list[SimDevice]
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'later.db'}")  # no tables yet: writes fail
    ingestor = Ingestor(db, Keys(devices), make_settings(tmp_path), clock=Clock())
    dev = devices[0]
    ingestor.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, T0)))
    assert ingestor.flush() == 0
    assert ingestor.flush_failures >= 1
    assert not ingestor.dead_lettered  # the database takes no write: an outage, not poison
    Base.metadata.create_all(db.engine)
    enroll(db, devices)
    assert ingestor.flush() == 1
    with db.session() as session:
        assert session.scalars(select(TelemetryBucket.requests)).all() == [100]
    db.dispose()


def test_two_replicas_flushing_the_same_bucket_at_once_lose_nothing(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    enroll(database, devices)
    replicas = [
        Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock()) for _ in range(2)
    ]
    for i, replica in enumerate(replicas):
        for dev in devices:
            for minute in range(2):
                start = T0 + dt.timedelta(minutes=2 * minute + i)
                replica.handle(*signed(dev, TopicKind.TELEMETRY, telemetry(dev, start)))
    barrier = threading.Barrier(2)

    def flush(replica: Ingestor) -> None:
        barrier.wait()
        replica.flush()

    threads = [threading.Thread(target=flush, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    with database.session() as session:
        rows = session.execute(
            select(
                TelemetryBucket.device_id,
                TelemetryBucket.windows,
                TelemetryBucket.requests,
                TelemetryBucket.running_requests,
            )
        ).all()
        newest = session.scalars(select(TelemetryLatest.device_id)).all()
    # One bucket each, so its running sum is its own count, whichever replica wrote last.
    assert sorted(rows) == sorted((dev.id, 4, 400, 400) for dev in devices)
    assert sorted(newest) == sorted(dev.id for dev in devices)
    assert all(not r._pending for r in replicas)


def test_retention_deletes_old_buckets_and_marks_silent_devices_offline(
    ingestor: Ingestor, database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path, telemetry_retention=dt.timedelta(days=1), offline_after=dt.timedelta(minutes=2)
    )
    old, fresh = devices[0], devices[1]
    ingestor.handle(*signed(old, TopicKind.TELEMETRY, telemetry(old, T0 - dt.timedelta(days=2))))
    ingestor.handle(*signed(fresh, TopicKind.TELEMETRY, telemetry(fresh, T0)))
    ingestor.flush()
    with database.session() as session:
        session.execute(
            update(Device).where(Device.id == old.id).values(last_seen=T0 - dt.timedelta(minutes=5))
        )
    with database.session() as session:
        result = apply_retention(session, settings, T0)
    assert (result.buckets_deleted, result.devices_marked_offline) == (1, 1)
    with database.session() as session:
        assert session.scalars(select(TelemetryBucket.device_id)).all() == [fresh.id]
    assert not device_row(database, old.id).online
    assert device_row(database, fresh.id).online
    assert not device_row(database, devices[2].id).online  # never seen: untouched


def test_retention_marks_silent_devices_offline_without_waiting_for_a_flush(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite has one writer: nothing is locked row by row")
    enroll(database, devices)
    settings = make_settings(tmp_path, offline_after=dt.timedelta(minutes=2))
    with database.session() as session:
        session.execute(update(Device).values(online=True, last_seen=T0 - dt.timedelta(minutes=5)))
    written, silent = devices[0], devices[1:]
    result: list[int] = []

    def retention() -> None:
        with database.session() as session:
            result.append(apply_retention(session, settings, T0).devices_marked_offline)

    with database.session() as flush:  # a flush holding its device's row, as ingestion does
        flush.scalars(select(Device).where(Device.id == written.id).with_for_update()).all()
        thread = threading.Thread(target=retention)
        thread.start()
        thread.join(60)
        finished = not thread.is_alive()
    thread.join()
    assert finished, "retention waited for a row ingestion held"
    assert result == [len(silent)]
    assert device_row(database, written.id).online  # being written: not silent
    assert not any(device_row(database, device.id).online for device in silent)


def test_ingestion_does_not_wait_for_a_rollout_adding_its_device(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    """A rollout inserting a member row holds its device's row FOR KEY SHARE (the foreign
    key) until it commits; ingestion changes no key, so it locks FOR NO KEY UPDATE and goes on
    (FOR UPDATE would wait, and deadlock when the rollout waits for a row ingestion holds)."""
    if database.is_sqlite:
        pytest.skip("SQLite has one writer: nothing is locked row by row")
    enroll(database, devices)
    dev = devices[0]
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev)))

    with database.session() as rollout:  # the lock an inserted rollout_devices row takes
        query = select(Device).where(Device.id == dev.id).with_for_update(read=True, key_share=True)
        rollout.scalars(query).all()
        thread = threading.Thread(target=ingestor.flush)
        thread.start()
        thread.join(30)
        finished = not thread.is_alive()
    thread.join()
    assert finished, "ingestion waited for a row a rollout held FOR KEY SHARE"
    assert ingestor.counts["heartbeat"] == 1
    assert device_row(database, dev.id).last_seen is not None


class RekeyedKeys(Keys):
    """A stale cache: the old key unless asked for a fresh one."""

    def __init__(self, devices: list[SimDevice], stale: dict[str, str]) -> None:
        super().__init__(devices)
        self.stale = stale

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None:
        if not fresh and device_id in self.stale:
            return self.stale[device_id]
        return super().public_key(device_id, fresh=fresh)


def test_a_signature_failure_asks_once_for_a_fresh_key(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    enroll(database, devices)
    dev = devices[0]
    keys = RekeyedKeys(devices, {dev.id: DeviceKey.generate().public_hex})
    ingestor = Ingestor(database, keys, make_settings(tmp_path), clock=Clock())
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev)))
    assert ingestor.counts["heartbeat"] == 1 and keys.lookups == 1
    topic = DeviceTopics(dev.id).heartbeat
    ingestor.handle(topic, sign_device_payload(topic, heartbeat(dev), DeviceKey.generate()))
    assert ingestor.refused["device-signature"] == 1 and keys.lookups == 2


def test_the_newest_of_heartbeat_and_status_wins_within_a_batch(
    ingestor: Ingestor, database: Database, devices: list[SimDevice]
) -> None:
    dev = devices[0]
    old = {"model_name": "demo", "model_version": "1.0.0", "install_state": "committed"}
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, **old)))
    report = status(dev, 1, "committed", bundle_name="demo", bundle_version="2.0.0")
    ingestor.handle(*signed(dev, TopicKind.STATUS, report))
    ingestor.flush()
    row = device_row(database, dev.id)
    assert (row.model_version, row.install_state) == ("2.0.0", "committed")
    # and a heartbeat after a status report sets the state it reports
    ingestor.handle(*signed(dev, TopicKind.STATUS, status(dev, 2, "downloading")))
    ingestor.handle(*signed(dev, TopicKind.HEARTBEAT, heartbeat(dev, install_state="verifying")))
    ingestor.flush()
    assert device_row(database, dev.id).install_state == "verifying"


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("where", ["this replica", "another replica"])
def test_a_device_removed_and_enrolled_with_a_new_key_counts_its_status_from_one(
    database: Database, devices: list[SimDevice], tmp_path: Path, where: str
) -> None:
    enroll(database, devices)
    monotonic = Monotonic()
    keys = DeviceKeyCache(database, monotonic=monotonic)  # the real cache, from the database
    ingestor = Ingestor(database, keys, make_settings(tmp_path), clock=Clock())
    old = devices[0]
    for seq, state in enumerate(["downloading", "verifying", "committed"], 1):
        ingestor.handle(*signed(old, TopicKind.STATUS, status(old, seq, state)))
    ingestor.flush()
    assert device_row(database, old.id).status_sequence == 3

    # Re-flashed: an operator removes the device, it enrolls again with a new key.
    with database.session() as session:
        remove_device(session, old.id, Principal("ops", Role.OPERATOR))
    new = SimDevice(old.id)
    enroll(database, [new])
    if where == "this replica":
        keys.invalidate(new.id)  # as the API's enroll and remove routes do
    else:
        monotonic.now += 5  # the cache re-reads a key once after a signature failure
    ingestor.handle(*signed(new, TopicKind.STATUS, status(new, 1, "idle")))
    ingestor.flush()
    assert ingestor.duplicates["status"] == 0 and ingestor.counts["status"] == 4
    row = device_row(database, new.id)
    assert (row.status_sequence, row.install_state) == (1, "idle")
    with database.session() as session:
        kept = session.scalars(
            select(StatusReportRow.sequence).where(StatusReportRow.device_id == new.id)
        ).all()
    assert kept == [1]
    # The new key's sequence is the one remembered now; the old key is refused.
    ingestor.handle(*signed(new, TopicKind.STATUS, status(new, 1, "idle")))
    ingestor.handle(*signed(old, TopicKind.STATUS, status(old, 4, "idle")))
    assert ingestor.duplicates["status"] == 1 and ingestor.refused["device-signature"] == 1


def test_a_device_removed_through_another_replica_is_refused_within_the_check_interval(
    database: Database, devices: list[SimDevice], tmp_path: Path
) -> None:
    enroll(database, devices)
    other_db = Database(database.url)  # the other replica: its own connections, the same data
    monotonic = Monotonic()
    here_keys = DeviceKeyCache(database, monotonic=monotonic)
    there_keys = DeviceKeyCache(other_db, check_interval_s=5, monotonic=monotonic)
    here = Ingestor(database, here_keys, make_settings(tmp_path), clock=Clock())
    there = Ingestor(other_db, there_keys, make_settings(tmp_path), clock=Clock())
    removed = devices[0]
    try:
        for replica in (here, there):
            replica.handle(*signed(removed, TopicKind.HEARTBEAT, heartbeat(removed)))
        with database.session() as session:
            remove_device(session, removed.id, Principal("ops", Role.OPERATOR))
        here_keys.invalidate(removed.id)  # as the API's remove route does
        monotonic.now += 4.9
        for replica in (here, there):
            replica.handle(*signed(removed, TopicKind.HEARTBEAT, heartbeat(removed)))
        assert here.refused["unknown-device"] == 1  # at once where it was removed
        assert there.refused["unknown-device"] == 0  # the other replica has not checked yet
        monotonic.now += 0.1
        there.handle(*signed(removed, TopicKind.HEARTBEAT, heartbeat(removed)))
        assert there.refused["unknown-device"] == 1  # its check noticed the removal
        kept = devices[1]
        there.handle(*signed(kept, TopicKind.HEARTBEAT, heartbeat(kept)))
        assert there.counts["heartbeat"] == 3
    finally:
        other_db.dispose()


def test_key_lookups_do_not_grow_with_the_messages(database: Database, tmp_path: Path) -> None:
    fleet = [SimDevice(f"dev-{i:03d}") for i in range(50)]
    enroll(database, fleet)
    monotonic = Monotonic()
    keys = DeviceKeyCache(database, check_interval_s=5, monotonic=monotonic)
    ingestor = Ingestor(database, keys, make_settings(tmp_path), clock=Clock())
    rounds = 60  # ten minutes of every device sending a heartbeat every 10 s
    for _ in range(rounds):
        monotonic.now += 10
        for device in fleet:
            ingestor.handle(*signed(device, TopicKind.HEARTBEAT, heartbeat(device)))
    assert ingestor.counts["heartbeat"] == len(fleet) * rounds
    assert keys.loads == len(fleet)  # one lookup per device, none per message
    assert keys.checks == rounds  # one change query per interval, for all of them
