"""Alert events to a webhook: recorded with the alert's change, signed, retried, visible.

The receiver is a real HTTP server on 127.0.0.1 (a thread) that records every
request and answers the statuses a test queues. The delivery worker's clock is
moved by hand and its ticks are called directly: nothing waits on timing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from edgefleet.keys import save_private_key
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, AuditEntry, WebhookDelivery
from edgefleet.server.drift.alerts import acknowledge_alert, open_alert, resolve_alert
from edgefleet.server.leases import release_lease
from edgefleet.server.mqtt.retention import apply_retention
from edgefleet.server.principals import Principal, Role
from edgefleet.server.runner import FleetServer, webhook_worker
from edgefleet.server.settings import ServerSettings
from edgefleet.server.webhooks.delivery import WebhookDeliverer
from edgefleet.server.webhooks.events import record_alert_events
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.conftest import KeySet
from tests.server.apiclient import MovableClock, make_api, serve
from tests.server.test_runner_workers import FullDiskDatabase, survives_a_full_disk
from tests.server.webhookreceiver import Receiver, running_receiver

SECRET = b"receiver-and-server-share-this"
SERVER_URL = "https://fleet.example"
START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
LISTS_THEM = "`edgefleet webhooks deliveries` lists them"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


def webhook_settings(tmp_path: Path, url: str, **overrides: Any) -> ServerSettings:
    base = ServerSettings(
        data_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        server_key_path=tmp_path / "server.key",
        webhook_url=url,
        webhook_secret=SECRET,
        replica_id="replica-a",
    )
    return replace(base, **overrides)


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock(START)


def deliverer(
    database: Database, settings: ServerSettings, clock: MovableClock
) -> WebhookDeliverer:
    record_alert_events(database, SERVER_URL)
    return WebhookDeliverer(database, settings, clock=clock, rng=random.Random(7))


def new_alert(database: Database, at: dt.datetime, feature: str = "pixel_3") -> int:
    with database.session() as session:
        alert = Alert(
            kind="feature-drift",
            scope="cohort",
            device_id=None,
            cohort="version",
            bundle_name="demo",
            bundle_version="1.0.0",
            feature=feature,
            opened_at=at,
            evidence={"statistic": 31.5, "threshold": 20.1, "samples": 500},
        )
        return open_alert(session, alert).id


def resolve(database: Database, alert_id: int, at: dt.datetime) -> None:
    with database.session() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None
        resolve_alert(session, alert, at, {"statistic": 3.0})


def deliveries(database: Database) -> list[WebhookDelivery]:
    with database.session() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_events_are_signed_with_the_secret(
    database: Database, tmp_path: Path, receiver: Receiver, clock: MovableClock
) -> None:
    worker = deliverer(database, webhook_settings(tmp_path, receiver.url), clock)
    alert_id = new_alert(database, clock.now)

    report = worker.tick()

    assert report.held and len(report.delivered) == 1 and report.failed == []
    (request,) = receiver.requests
    headers = request.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Edgefleet-Event"] == "alert.opened"
    (row,) = deliveries(database)
    assert headers["X-Edgefleet-Delivery"] == str(row.id)
    timestamp = headers["X-Edgefleet-Timestamp"]
    assert int(timestamp) == int(clock.now.timestamp())
    signed = timestamp.encode() + b"." + request.body

    def signature(secret: bytes) -> str:
        return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()

    assert hmac.compare_digest(headers["X-Edgefleet-Signature"], signature(SECRET))
    assert headers["X-Edgefleet-Signature"] != signature(b"another secret")
    payload = request.payload
    assert payload["event"] == "alert.opened" and payload["server"] == SERVER_URL
    assert payload["occurred_at"] == "2026-03-01T12:00:00Z"
    alert = payload["alert"]
    assert (alert["id"], alert["kind"], alert["scope"]) == (alert_id, "feature-drift", "cohort")
    assert (alert["bundle_name"], alert["feature"], alert["resolved_at"]) == (
        "demo",
        "pixel_3",
        None,
    )
    assert alert["evidence"]["statistic"] == 31.5
    assert row.delivered_at == clock.now and row.attempts == 1 and row.last_status == 200


def test_a_failing_receiver_gets_the_event_after_backoff(
    database: Database,
    tmp_path: Path,
    receiver: Receiver,
    clock: MovableClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.statuses = [503, 503]
    worker = deliverer(database, webhook_settings(tmp_path, receiver.url), clock)
    new_alert(database, clock.now)

    with caplog.at_level(logging.WARNING, logger="edgefleet.server.webhooks.delivery"):
        assert len(worker.tick().failed) == 1
    (row,) = deliveries(database)
    assert (row.attempts, row.last_status, row.last_error) == (1, 503, "503 Service Unavailable")
    first_wait = row.next_attempt_at - clock.now
    assert dt.timedelta(seconds=2.5) <= first_wait <= dt.timedelta(seconds=5)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"webhook http://127.0.0.1:{receiver.url.split(':')[2].split('/')[0]}:")
    assert "503 Service Unavailable" in line and "attempt 1 of 12 failed, next in" in line
    assert "/hooks/" not in line  # a webhook's path may hold a secret

    clock.now = row.next_attempt_at - dt.timedelta(seconds=1)
    assert worker.tick().failed == [] and len(receiver.requests) == 1  # not due yet
    clock.now = row.next_attempt_at
    assert len(worker.tick().failed) == 1
    (row,) = deliveries(database)
    second_wait = row.next_attempt_at - clock.now
    assert dt.timedelta(seconds=5) <= second_wait <= dt.timedelta(seconds=10)

    clock.now = row.next_attempt_at
    assert len(worker.tick().delivered) == 1
    assert len(receiver.requests) == 3
    assert len({r.headers["X-Edgefleet-Delivery"] for r in receiver.requests}) == 1
    (row,) = deliveries(database)
    assert (row.attempts, row.last_status, row.last_error) == (3, 200, None)
    assert row.delivered_at == clock.now


def test_events_of_one_alert_arrive_in_order(
    database: Database, tmp_path: Path, receiver: Receiver, clock: MovableClock
) -> None:
    worker = deliverer(database, webhook_settings(tmp_path, receiver.url), clock)
    first = new_alert(database, clock.now, "pixel_1")
    second = new_alert(database, clock.now, "pixel_2")
    resolve(database, first, clock.now)
    with database.session() as session:
        acknowledge_alert(session, first, Principal("oncall", Role.OPERATOR), clock.now)
    receiver.statuses = [503]  # the first alert's "opened" fails once

    worker.tick()

    # Its later events wait behind it; the other alert's event does not.
    assert receiver.events() == [(first, "alert.opened"), (second, "alert.opened")]
    clock.advance(3600)
    worker.tick()
    assert receiver.events()[2:] == [
        (first, "alert.opened"),
        (first, "alert.resolved"),
        (first, "alert.acknowledged"),
    ]
    resolved = receiver.requests[3].payload["alert"]
    assert resolved["resolved_at"] == "2026-03-01T12:00:00Z"
    assert resolved["evidence"]["resolved_by"] == {"statistic": 3.0}
    assert receiver.requests[4].payload["alert"]["acknowledged_by"] == "oncall"
    assert all(row.delivered_at is not None for row in deliveries(database))


def test_a_change_rolled_back_records_no_event(database: Database, clock: MovableClock) -> None:
    record_alert_events(database, SERVER_URL)
    with pytest.raises(RuntimeError, match="evaluator failed"), database.session() as session:
        open_alert(
            session,
            Alert(
                kind="dataset-drift",
                scope="cohort",
                cohort="version",
                bundle_name="demo",
                bundle_version="1.0.0",
                opened_at=clock.now,
                evidence={},
            ),
        )
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        raise RuntimeError("evaluator failed after opening the alert")
    assert deliveries(database) == []


def test_without_a_webhook_no_event_is_recorded(database: Database, clock: MovableClock) -> None:
    alert_id = new_alert(database, clock.now)
    resolve(database, alert_id, clock.now)
    with database.session() as session:
        acknowledge_alert(session, alert_id, Principal("oncall", Role.OPERATOR), clock.now)
    assert deliveries(database) == []


def test_one_replica_delivers(
    database: Database, tmp_path: Path, receiver: Receiver, clock: MovableClock
) -> None:
    settings = webhook_settings(tmp_path, receiver.url)
    holder = deliverer(database, settings, clock)
    other = deliverer(database, replace(settings, replica_id="replica-b"), clock)
    assert holder.tick().held
    new_alert(database, clock.now)
    report = other.tick()
    assert not report.held and receiver.requests == []
    assert len(holder.tick().delivered) == 1


def test_a_delivery_being_sent_is_not_sent_again_when_the_lease_moves(
    database: Database, tmp_path: Path, receiver: Receiver, clock: MovableClock
) -> None:
    settings = webhook_settings(tmp_path, receiver.url)
    holder = deliverer(database, settings, clock)
    other = deliverer(database, replace(settings, replica_id="replica-b"), clock)
    new_alert(database, clock.now)
    reports = []

    def lease_moves_meanwhile() -> None:
        with database.session() as session:
            assert release_lease(session, "webhook-delivery", "replica-a")
        reports.append(other.tick())

    receiver.during_request = lease_moves_meanwhile
    assert len(holder.tick().delivered) == 1
    (taken_over,) = reports
    assert taken_over.held and taken_over.delivered == [] and taken_over.failed == []
    assert len(receiver.requests) == 1
    (row,) = deliveries(database)
    assert row.delivered_at == clock.now and row.attempts == 1


def test_the_delivery_worker_survives_a_foreign_error(
    sqlite_database: Database,
    tmp_path: Path,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = FullDiskDatabase(sqlite_database.url)
    settings = webhook_settings(tmp_path, receiver.url, webhook_interval_s=0.05)
    record_alert_events(sqlite_database, SERVER_URL)
    new_alert(sqlite_database, utcnow())
    worker = webhook_worker(WebhookDeliverer(flaky, settings))

    def delivered() -> bool:  # and the step that delivered it has ended
        rows = deliveries(sqlite_database)
        return rows[0].delivered_at is not None and worker.healthy

    try:
        survives_a_full_disk(worker, flaky, delivered, caplog)
        assert len(receiver.requests) == 1
    finally:
        flaky.dispose()


@pytest.mark.parametrize("url", [None, "http://127.0.0.1:9/hook"])
def test_the_server_records_events_only_with_a_webhook(
    tmp_path: Path, trust_file: Path, keyset: KeySet, url: str | None
) -> None:
    save_private_key(tmp_path / "server.key", keyset.server)
    settings = webhook_settings(
        tmp_path, "", trust_path=trust_file, webhook_url=url, public_url=SERVER_URL
    )
    server = FleetServer(settings)
    try:
        alert_id = new_alert(server.db, START)
        events = [(row.alert_id, row.payload["server"]) for row in deliveries(server.db)]
    finally:
        server.close()
    assert events == ([] if url is None else [(alert_id, SERVER_URL)])
    assert (server.deliverer is None) == (url is None)


def test_given_up_deliveries_show_in_the_api_the_cli_and_metrics(
    sqlite_database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = make_api(
        sqlite_database,
        tmp_path,
        trust,
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        webhook_max_attempts=2,
    )
    api.clock.now = START
    worker = deliverer(sqlite_database, api.context.settings, api.clock)
    alert_id = new_alert(sqlite_database, START)
    receiver.statuses = [500, 502]
    worker.tick()
    api.clock.advance(3600)
    worker.tick()
    api.clock.advance(3600)
    assert worker.tick().failed == [] and len(receiver.requests) == 2  # given up

    listed = api.get("/webhooks/deliveries", Role.VIEWER, params={"failed": "true"})
    assert listed.status_code == 200, listed.text
    (row,) = listed.json()
    assert row["alert_id"] == alert_id and row["event"] == "alert.opened"
    assert (row["state"], row["attempts"], row["max_attempts"]) == ("failed", 2, 2)
    assert (row["last_status"], row["last_error"]) == (502, "502 Bad Gateway")
    assert row["next_attempt_at"] is None

    metrics = {
        sample.name: sample.value
        for family in text_string_to_metric_families(api.client.get("/metrics").text)
        for sample in family.samples
    }
    assert metrics["edgefleet_webhook_deliveries_failed"] == 1
    assert metrics["edgefleet_webhook_deliveries_pending"] == 0

    run = Cli(capsys)
    with serve(api) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.OPERATOR])
        out, err = run("webhooks", "deliveries", "--failed")
        header, line = out.splitlines()
        assert header.split() == ["ID", "EVENT", "ALERT", "STATE", "ATTEMPTS", "NEXT", "LAST",
                                  "ERROR"]  # fmt: skip
        assert line.split()[:6] == [str(row["id"]), "alert.opened", str(alert_id), "failed",
                                    "2/2", "-"]  # fmt: skip
        assert line.endswith("502 Bad Gateway")
        assert "edgefleet webhooks retry ID" in err
        out, _ = run("webhooks", "deliveries", "--json")
        assert json.loads(out) == [row]

        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.VIEWER])
        _, err = run("webhooks", "retry", str(row["id"]), status=1)
        assert err.startswith("refused [forbidden]: ")
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.OPERATOR])
        out, _ = run("webhooks", "retry", str(row["id"]))
        assert out.startswith(f"delivery {row['id']} will be sent again")
        _, err = run("webhooks", "retry", "999", status=1)
        (line,) = err.splitlines()
        assert line == "refused [not-found]: no webhook delivery 999: " + LISTS_THEM

    (pending,) = api.get("/webhooks/deliveries", Role.VIEWER).json()
    assert (pending["state"], pending["attempts"]) == ("pending", 0)
    with sqlite_database.session() as session:
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "webhook.retry"))
        assert [entry.target for entry in audit] == [f"webhook delivery {row['id']}"]
    assert len(worker.tick().delivered) == 1
    assert api.get("/webhooks/deliveries", Role.VIEWER).json() == []
    again = api.post(f"/webhooks/deliveries/{row['id']}/retry", Role.OPERATOR)
    assert again.status_code == 409


def test_retention_deletes_old_delivered_events_only(
    database: Database, tmp_path: Path, receiver: Receiver, clock: MovableClock
) -> None:
    settings = webhook_settings(tmp_path, receiver.url, webhook_max_attempts=1)
    worker = deliverer(database, settings, clock)
    new_alert(database, clock.now, "delivered")
    worker.tick()
    receiver.statuses = [500]
    new_alert(database, clock.now, "failed")
    worker.tick()
    later = clock.now + settings.telemetry_retention + dt.timedelta(minutes=1)
    with database.session() as session:
        result = apply_retention(session, settings, later)
    assert result.deliveries_deleted == 1
    (kept,) = deliveries(database)
    assert kept.delivered_at is None and kept.last_status == 500


def test_server_run_webhook_options(
    run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust, key = tmp_path / "trust.json", tmp_path / "server.key"
    trust.write_text("{}")
    key.write_text("")
    received: list[ServerSettings] = []
    # The runner has tests of its own: stand in for it with its interface, run_server(settings).
    runner = types.ModuleType("edgefleet.server.runner")
    runner.run_server = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefleet.server.runner", runner)
    start = ("server", "run", "--trust", trust, "--server-key", key, "--data", tmp_path / "d")

    monkeypatch.setenv("EF_HOOK_SECRET", "s3cret")
    run_cli(*start, "--webhook-url", "https://ci.example/hook", "--webhook-secret-env",
            "EF_HOOK_SECRET")  # fmt: skip
    (settings,) = received
    assert settings.webhook_url == "https://ci.example/hook"
    assert settings.webhook_secret == b"s3cret" and "s3cret" not in repr(settings)
    received.clear()
    run_cli(*start)
    (settings,) = received
    assert settings.webhook_url is None and settings.webhook_secret is None

    received.clear()
    monkeypatch.setenv("EF_EMPTY", "")
    refusals = {
        ("--webhook-url", "https://ci.example/hook", "--webhook-secret-env", "EF_UNSET"):
            "--webhook-secret-env EF_UNSET: that environment variable is not set or empty",
        ("--webhook-url", "https://ci.example/hook", "--webhook-secret-env", "EF_EMPTY"):
            "--webhook-secret-env EF_EMPTY: that environment variable is not set or empty",
        ("--webhook-url", "https://ci.example/hook"): "--webhook-url needs --webhook-secret-env",
        ("--webhook-url", "ftp://ci.example/hook", "--webhook-secret-env", "EF_HOOK_SECRET"):
            "--webhook-url 'ftp://ci.example/hook': give an http:// or https:// URL",
        ("--webhook-secret-env", "EF_HOOK_SECRET"): "--webhook-secret-env needs --webhook-url",
    }  # fmt: skip
    for options, message in refusals.items():
        _, err = run_cli(*start, *options, status=2)
        (line,) = err.splitlines()
        assert line.startswith(f"error [usage]: {message}"), line
    assert received == []


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)
