"""What the database refuses of one device is set aside; the rest of the fleet is stored.

A batch the database refuses as a whole is written one device at a time and the
part it still refuses is set aside (logged, counted, shown in /health, kept as a
dead letter: tests/server/test_dead_letters.py); an outage
(the database takes no write) keeps everything queued instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text

from edgefleet.mqtt.messages import Heartbeat, StatusReport, encode_message
from edgefleet.mqtt.topics import TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, StatusReportRow, TelemetryBucket
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot
from tests.server.apiclient import make_api
from tests.server.fleet import SimDevice
from tests.server.test_ingest import (
    T0,
    Clock,
    Keys,
    enroll,
    heartbeat,
    make_settings,
    signed,
    status,
    telemetry,
)

POISON = "refused by the database"  # a status report reason the test's trigger refuses


def refuse_poison_reports(db: Database) -> None:
    """Make the database refuse a status report whose reason is POISON, as it refuses
    content it cannot store."""
    with db.session() as session:
        if db.is_sqlite:
            session.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON status_reports "
                    f"WHEN NEW.reason = '{POISON}' "
                    "BEGIN SELECT RAISE(ABORT, 'poison status report'); END"
                )
            )
        else:
            session.execute(
                text(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'poison status report'; END $$"
                )
            )
            session.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON status_reports FOR EACH ROW "
                    f"WHEN (NEW.reason = '{POISON}') EXECUTE FUNCTION refuse_poison()"
                )
            )


def send_everything(ingestor: Ingestor, device: SimDevice, sequence: int, reason: str) -> None:
    """A status report, a heartbeat and a telemetry window (its own) from `device`."""
    ingestor.handle(
        *signed(device, TopicKind.STATUS, status(device, sequence, "idle", reason=reason))
    )
    ingestor.handle(*signed(device, TopicKind.HEARTBEAT, heartbeat(device)))
    window_start = T0 + dt.timedelta(minutes=sequence)
    ingestor.handle(*signed(device, TopicKind.TELEMETRY, telemetry(device, window_start)))


def stored(db: Database) -> tuple[dict[str, int], list[str], list[str]]:
    """Status sequences by device, devices with a heartbeat, devices with telemetry."""
    with db.session() as session:
        sequences = {
            device_id: sequence
            for device_id, sequence in session.execute(select(Device.id, Device.status_sequence))
        }
        beating = session.scalars(select(Device.id).where(Device.heartbeat.is_not(None))).all()
        measured = session.scalars(select(TelemetryBucket.device_id)).all()
    return sequences, sorted(beating), sorted(measured)


def test_one_device_the_database_refuses_does_not_hold_back_the_fleet(
    database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    devices = [SimDevice(f"dev-{i}") for i in range(3)]
    enroll(database, devices)
    refuse_poison_reports(database)
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    acknowledged: list[str] = []
    for device in devices:
        send_everything(ingestor, device, 1, POISON if device.id == "dev-1" else "fine")
    ingestor.when_stored(lambda: acknowledged.append("first"))

    with caplog.at_level(logging.ERROR, logger="edgefleet.server.mqtt.ingest"):
        assert ingestor.flush() == 6  # dev-0's and dev-2's messages

    assert acknowledged == ["first"]  # the link flows again
    sequences, beating, measured = stored(database)
    assert sequences == {"dev-0": 1, "dev-1": 0, "dev-2": 1}
    assert beating == measured == ["dev-0", "dev-2"]
    assert ingestor.dead_lettered == {"status": 1, "heartbeat": 1, "telemetry": 1}
    last = ingestor.last_dead_letter
    assert last is not None and last.device_id == "dev-1" and last.at == T0
    assert "poison status report" in last.error and "\n" not in last.error
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "'dev-1'" in line and "1 status" in line and "1 telemetry" in line
    assert "poison status report" in line

    # Later batches are written as before, dev-1's honest messages included.
    send_everything(ingestor, devices[1], 2, "fine")
    ingestor.when_stored(lambda: acknowledged.append("second"))
    assert ingestor.flush() == 3
    assert acknowledged == ["first", "second"]
    assert stored(database)[0]["dev-1"] == 2

    api = make_api(database, tmp_path, trust)
    api.context.ingest = ingestor
    health = api.client.get("/api/v1/health")
    assert health.status_code == 200
    assert health.json()["ingestion"] == {
        "dead_lettered": 3,
        "last_dead_letter": {
            "device_id": "dev-1",
            "at": format_time(T0),
            "dropped": {
                "status": 1,
                "heartbeat": 1,
                "telemetry": 1,
                "diagnostics": 0,
                "presence": 0,
            },
            "error": last.error,
            "kept_id": last.kept_id,
        },
    }
    assert last.kept_id is not None  # tests/server/test_dead_letters.py: what it keeps
    samples = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(api.client.get("/metrics").text)
        for sample in family.samples
    }
    assert samples[("edgefleet_ingest_dead_lettered_total", ("status",))] == 1
    assert samples[("edgefleet_ingest_dead_lettered_total", ("telemetry",))] == 1


def test_counts_that_add_up_beyond_what_the_database_stores_are_set_aside(
    database: Database, tmp_path: Path
) -> None:
    devices = [SimDevice(f"dev-{i}") for i in range(2)]
    enroll(database, devices)
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    most = 2**63 - 1  # each window is valid; their sum is not a BIGINT
    for minute in range(2):
        start = T0 + dt.timedelta(minutes=minute)
        window = telemetry(devices[0], start, requests=most)
        ingestor.handle(*signed(devices[0], TopicKind.TELEMETRY, window))
    ingestor.handle(*signed(devices[1], TopicKind.TELEMETRY, telemetry(devices[1], T0)))
    assert ingestor.flush() == 1
    assert stored(database)[2] == ["dev-1"]
    assert ingestor.dead_lettered == {"telemetry": 2}


def raw_status(device_id: str, sequence: int, reason: str) -> bytes:
    """A status report's bytes as a device could send them, past the sender's schema."""
    report = {
        "schema_version": 1,
        "device_id": device_id,
        "sent_at": format_time(T0),
        "sequence": sequence,
        "install_state": "idle",
        "reason": reason,
    }
    return json.dumps(report).encode("utf-8")


@pytest.mark.parametrize(
    "poison",
    [
        raw_status("dev-1", 1, "bad\u0000byte"),  # PostgreSQL text refuses NUL
        raw_status("dev-1", 2**63, "fine"),  # beyond BIGINT
    ],
    ids=["nul", "bigint"],
)
def test_content_no_database_can_store_is_refused_as_malformed(
    database: Database, tmp_path: Path, poison: bytes
) -> None:
    devices = [SimDevice(f"dev-{i}") for i in range(3)]
    enroll(database, devices)
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    ingestor.handle(*signed(devices[1], TopicKind.STATUS, poison))
    for device in devices:
        ingestor.handle(*signed(device, TopicKind.HEARTBEAT, heartbeat(device)))
    assert ingestor.refused == {"malformed": 1}
    assert ingestor.flush() == 3
    assert not ingestor.dead_lettered
    sequences, beating, _ = stored(database)
    assert sequences == {"dev-0": 0, "dev-1": 0, "dev-2": 0}
    assert beating == ["dev-0", "dev-1", "dev-2"]


def test_a_nul_a_sender_puts_in_a_message_is_replaced_so_the_server_takes_it(
    database: Database, tmp_path: Path
) -> None:
    device = SimDevice("dev-0")
    enroll(database, [device])
    ingestor = Ingestor(database, Keys([device]), make_settings(tmp_path), clock=Clock())
    report = StatusReport(
        device_id=device.id,
        sent_at=format_time(T0),
        sequence=1,
        install_state="failed",
        reason="cannot open model\u0000.onnx",
    )
    ingestor.handle(*signed(device, TopicKind.STATUS, encode_message(report)))
    assert ingestor.flush() == 1
    with database.session() as session:
        reasons = session.scalars(select(StatusReportRow.reason)).all()
    assert reasons == ["cannot open model\ufffd.onnx"]


def test_an_escaped_backslash_before_u0000_is_not_taken_for_a_nul() -> None:
    beat = Heartbeat.model_validate_json(heartbeat(SimDevice("dev-0")))
    tricky = beat.model_copy(update={"frozen_reason": "C:\\u0000"})
    assert json.loads(encode_message(tricky))["frozen_reason"] == "C:\\u0000"


def test_an_outage_keeps_everything_queued_and_writes_it_after(
    postgres_server: object, database: Database, tmp_path: Path
) -> None:
    if database.is_sqlite:
        pytest.skip("the SQLite outage: test_ingest.py's database without tables")
    devices = [SimDevice(f"dev-{i}") for i in range(2)]
    enroll(database, devices)
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    acknowledged: list[int] = []
    for device in devices:
        send_everything(ingestor, device, 1, "fine")
    ingestor.when_stored(lambda: acknowledged.append(1))
    name = database.engine.url.database
    admin_url = database.engine.url.set(database="postgres")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        assert ingestor.flush() == 0
        assert ingestor.flush() == 0
        assert acknowledged == [] and not ingestor.dead_lettered
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert ingestor.flush() == 6
    assert acknowledged == [1]
    sequences, beating, measured = stored(database)
    assert sequences == {"dev-0": 1, "dev-1": 1}
    assert beating == measured == ["dev-0", "dev-1"]


def test_a_device_row_locked_elsewhere_waits_for_the_next_flush_and_is_not_dropped(
    database: Database, tmp_path: Path
) -> None:
    if database.is_sqlite:
        pytest.skip("row locks: PostgreSQL")
    devices = [SimDevice(f"dev-{i}") for i in range(2)]
    enroll(database, devices)
    name = database.engine.url.database
    with database.engine.connect() as connection:  # a lock wait fails at once, not never
        connection.execute(text(f"ALTER DATABASE \"{name}\" SET lock_timeout = '100ms'"))
        connection.commit()
    database.engine.dispose()  # new connections take the setting
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path), clock=Clock())
    acknowledged: list[int] = []
    for device in devices:
        send_everything(ingestor, device, 1, "fine")
    ingestor.when_stored(lambda: acknowledged.append(1))
    holder = create_engine(database.engine.url)
    try:
        with holder.connect() as connection:
            connection.execute(text("SELECT id FROM devices WHERE id = 'dev-1' FOR UPDATE"))
            assert ingestor.flush() == 3  # dev-0's part; dev-1's waits for its lock
            assert acknowledged == [] and not ingestor.dead_lettered
            assert stored(database)[0] == {"dev-0": 1, "dev-1": 0}
            connection.rollback()
    finally:
        holder.dispose()
    assert ingestor.flush() == 3
    assert acknowledged == [1] and not ingestor.dead_lettered
    sequences, beating, measured = stored(database)
    assert sequences == {"dev-0": 1, "dev-1": 1}
    assert beating == measured == ["dev-0", "dev-1"]
