"""Dead letters: what the database refused of one device is kept as it arrived, shown,
replayed once the cause is fixed, or discarded; through the ingestor and the API."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from edgefleet.mqtt.devicesig import split_device_frame
from edgefleet.mqtt.topics import TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import AuditEntry, DeadLetterRow
from edgefleet.server.errors import ConflictError, NotFoundError
from edgefleet.server.mqtt.ingest import TAKEN, Ingestor
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.server.apiclient import Api, make_api, serve
from tests.server.fleet import SimDevice
from tests.server.test_ingest import T0, Clock, Keys, enroll, make_settings, signed, telemetry
from tests.server.test_ingest_poison import (
    POISON,
    refuse_poison_reports,
    send_everything,
    stored,
)


def allow_poison_reports(db: Database) -> None:
    """The cause fixed: the database takes the reports it refused."""
    with db.session() as session:
        if db.is_sqlite:
            session.execute(text("DROP TRIGGER refuse_poison"))
        else:
            session.execute(text("DROP TRIGGER refuse_poison ON status_reports"))
            session.execute(text("DROP FUNCTION refuse_poison"))


def letters(db: Database) -> list[DeadLetterRow]:
    with db.session() as session:
        return list(session.scalars(select(DeadLetterRow).order_by(DeadLetterRow.id)))


def first_status_sequence(row: DeadLetterRow) -> int:
    """The sequence of the status report a dead letter keeps first."""
    frame = base64.b64decode(row.messages[0]["payload"])
    return int(json.loads(split_device_frame(frame)[1])["sequence"])


@pytest.fixture
def fleet(database: Database) -> list[SimDevice]:
    devices = [SimDevice(f"dev-{i}") for i in range(2)]
    enroll(database, devices)
    refuse_poison_reports(database)
    return devices


def poisoned(
    database: Database, tmp_path: Path, devices: list[SimDevice], **settings: object
) -> Ingestor:
    """An ingestor that has set aside dev-1's status report, heartbeat and telemetry window."""
    ingestor = Ingestor(database, Keys(devices), make_settings(tmp_path, **settings), clock=Clock())
    for device in devices:
        send_everything(ingestor, device, 1, POISON if device.id == "dev-1" else "fine")
    assert ingestor.flush() == 3  # dev-0's
    return ingestor


def test_what_the_database_refuses_is_kept_as_it_arrived(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    ingestor = poisoned(database, tmp_path, fleet)
    [row] = letters(database)
    assert (row.device_id, row.at) == ("dev-1", T0)
    assert row.dropped == {
        "status": 1,
        "heartbeat": 1,
        "telemetry": 1,
        "diagnostics": 0,
        "presence": 0,
    }
    assert "poison status report" in row.error
    topics = [message["topic"] for message in row.messages]
    assert [topic.rsplit("/", 1)[1] for topic in topics] == ["status", "heartbeat", "telemetry"]
    assert all("/dev-1/" in topic for topic in topics)  # dev-0's were stored, not kept
    last = ingestor.last_dead_letter
    assert last is not None and last.kept_id == row.id


def test_a_replay_after_the_cause_is_fixed_stores_everything_and_deletes_the_letter(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    ingestor = poisoned(database, tmp_path, fleet)
    [row] = letters(database)
    allow_poison_reports(database)

    replay = ingestor.replay(row.id)

    assert replay.device_id == "dev-1"
    assert replay.outcomes == {TAKEN: 3}
    assert replay.settled and replay.again is None
    sequences, beating, measured = stored(database)
    assert sequences["dev-1"] == 1
    assert beating == measured == ["dev-0", "dev-1"]
    assert letters(database) == []
    with pytest.raises(NotFoundError, match="no dead letter"):
        ingestor.replay(row.id)


def test_a_replay_the_database_still_refuses_is_set_aside_again(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    ingestor = poisoned(database, tmp_path, fleet)
    [first] = letters(database)

    replay = ingestor.replay(first.id)

    assert replay.outcomes == {TAKEN: 3} and replay.settled
    [second] = letters(database)
    assert replay.again is not None and replay.again.kept_id == second.id != first.id
    assert second.messages == first.messages
    assert stored(database)[0]["dev-1"] == 0


def test_a_window_set_aside_is_taken_again_when_the_device_sends_it_again(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    """The deduplication forgets what was set aside: the device's outbox may bring it back."""
    ingestor = poisoned(database, tmp_path, fleet)
    allow_poison_reports(database)
    window = telemetry(fleet[1], T0 + dt.timedelta(minutes=1))  # the one send_everything sent
    ingestor.handle(*signed(fleet[1], TopicKind.TELEMETRY, window))
    assert ingestor.flush() == 1
    assert stored(database)[2] == ["dev-0", "dev-1"]


def test_only_the_newest_dead_letters_are_kept(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    ingestor = poisoned(database, tmp_path, fleet, dead_letters_kept=2)
    for sequence in (2, 3):
        send_everything(ingestor, fleet[1], sequence, POISON)
        assert ingestor.flush() == 0
    kept = letters(database)
    assert [first_status_sequence(row) for row in kept] == [2, 3]
    assert ingestor.dead_lettered["status"] == 3


def kept_gauge(api: Api) -> float:
    """`edgefleet_dead_letters` as /metrics shows it."""
    [value] = [
        sample.value
        for family in text_string_to_metric_families(api.client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "edgefleet_dead_letters"
    ]
    return value


def test_dead_letters_through_the_api(
    database: Database, tmp_path: Path, trust: TrustRoot, fleet: list[SimDevice]
) -> None:
    ingestor = poisoned(database, tmp_path, fleet)
    [row] = letters(database)
    api = make_api(database, tmp_path, trust)

    listed = api.get("/dead-letters?device=dev-1", Role.VIEWER)
    assert listed.status_code == 200
    [public] = listed.json()
    assert public["id"] == row.id and public["dropped"]["status"] == 1
    assert "messages" not in public
    assert api.get(f"/dead-letters/{row.id}", Role.VIEWER).status_code == 403

    detail = api.get(f"/dead-letters/{row.id}", Role.OPERATOR).json()
    status_message = json.loads(detail["messages"][0]["message"])
    assert status_message["reason"] == POISON and status_message["sequence"] == 1

    refused = api.post(f"/dead-letters/{row.id}/replay", Role.OPERATOR)
    assert refused.status_code == 409 and "ingests no MQTT" in refused.json()["detail"]

    assert kept_gauge(api) == 1
    api.context.ingest = ingestor
    allow_poison_reports(database)
    replayed = api.post(f"/dead-letters/{row.id}/replay", Role.OPERATOR)
    assert replayed.status_code == 200
    assert replayed.json() == {"outcomes": {TAKEN: 3}, "settled": True, "again": None}
    assert kept_gauge(api) == 0
    assert api.post(f"/dead-letters/{row.id}/replay", Role.OPERATOR).status_code == 404
    assert stored(database)[0]["dev-1"] == 1

    refuse_poison_reports(database)
    send_everything(ingestor, fleet[0], 2, POISON)
    ingestor.flush()
    [again] = letters(database)
    assert api.delete(f"/dead-letters/{again.id}", Role.OPERATOR).status_code == 204
    assert letters(database) == []
    assert api.delete(f"/dead-letters/{again.id}", Role.OPERATOR).status_code == 404
    with database.session() as session:
        actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()
    assert actions == ["dead-letters.replay", "dead-letters.discard"]


def test_dead_letters_through_the_cli(
    database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    fleet: list[SimDevice],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingestor = poisoned(database, tmp_path, fleet)
    [row] = letters(database)
    api = make_api(database, tmp_path, trust)
    api.context.ingest = ingestor
    run = Cli(capsys)
    with serve(api) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.OPERATOR])
        out, err = run("dead-letters", "list")
        header, line = out.splitlines()
        assert header.split() == ["ID", "DEVICE", "AT", "MESSAGES", "ERROR"]
        assert line.split()[:2] == [str(row.id), "dev-1"]
        assert "1 status, 1 heartbeat, 1 telemetry" in line and "poison status report" in line
        assert "edgefleet dead-letters replay ID" in err

        out, _ = run("dead-letters", "show", str(row.id))
        assert f"dead letter {row.id} of device dev-1" in out
        assert f'"sequence":1,"install_state":"idle","reason":"{POISON}"' in out

        _, err = run("dead-letters", "replay", str(row.id), status=1)
        assert f"kept as dead letter {row.id + 1}" in err  # the cause is not fixed yet
        allow_poison_reports(database)
        out, _ = run("dead-letters", "replay", str(row.id + 1))
        assert out.splitlines() == [
            f"dead letter {row.id + 1}: 3 {TAKEN}",
            "stored; the dead letter is deleted",
        ]
        out, _ = run("dead-letters", "list", "--json")
        assert json.loads(out) == []
        _, err = run("dead-letters", "discard", str(row.id), status=1)
        assert err.splitlines() == [
            f"refused [not-found]: no dead letter {row.id} (replayed or discarded?): "
            "`edgefleet dead-letters list` lists them"
        ]
    assert stored(database)[0]["dev-1"] == 1


def test_a_replay_the_database_cannot_write_yet_waits_and_is_not_taken_twice(
    database: Database, tmp_path: Path, fleet: list[SimDevice]
) -> None:
    if database.is_sqlite:
        pytest.skip("a database read-only for a while: PostgreSQL")
    ingestor = poisoned(database, tmp_path, fleet)
    [row] = letters(database)
    allow_poison_reports(database)
    name = database.engine.url.database
    with database.engine.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        connection.commit()
    database.engine.dispose()  # new connections take the setting
    try:
        replay = ingestor.replay(row.id)
        assert replay.outcomes == {TAKEN: 3}
        assert not replay.settled and replay.again is None
        with pytest.raises(ConflictError, match="wait for the database"):
            ingestor.replay(row.id)
    finally:
        autocommit = database.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as connection:
            connection.execute(text("SET default_transaction_read_only = off"))
            connection.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        database.engine.dispose()
    # Not deleted before its messages are written; then written once.
    assert [kept.id for kept in letters(database)] == [row.id]
    ingestor.flush()
    assert letters(database) == []
    assert stored(database)[0]["dev-1"] == 1
    assert ingestor.dead_lettered == {"status": 1, "heartbeat": 1, "telemetry": 1}
