"""Diagnostics requests on the server: a signed directive after the commit, audited; answers
stored only on the request they name, once, in time; expiry read from the clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from edgefleet.errors import PublishError
from edgefleet.mqtt import DiagnosticsReport, LogLine, verify_directive
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import AuditEntry, DiagnosticsRequest
from edgefleet.server.diagnostics import (
    diagnostics_for,
    diagnostics_state,
    record_answer,
    request_diagnostics,
)
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.errors import NotFoundError
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.principals import Principal, Role
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.rolloutsim import START, RecordingPublisher, add_device, make_settings

OPERATOR = Principal("ops", Role.OPERATOR)
TTL = dt.timedelta(minutes=5)


class RefusingPublisher:
    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        raise PublishError("not connected to the broker")


@pytest.fixture
def issuer(tmp_path: Path, keyset: KeySet) -> DirectiveIssuer:
    return DirectiveIssuer([keyset.server], make_settings(tmp_path), clock=lambda: START)


def ask(
    db: Database, issuer: DirectiveIssuer, publisher: Publisher, device_id: str = "dev-1"
) -> DiagnosticsRequest:
    with db.session() as session:
        request = request_diagnostics(session, issuer, publisher, device_id, OPERATOR, START)
        session.expunge(request)
        return request


def sequence_of(request: DiagnosticsRequest) -> int:
    assert request.directive_sequence is not None
    return request.directive_sequence


def answer(request: DiagnosticsRequest, **overrides: object) -> DiagnosticsReport:
    values: dict[str, object] = {
        "device_id": request.device_id,
        "sent_at": format_time(START + dt.timedelta(seconds=2)),
        "request_id": request.id,
        "directive_sequence": request.directive_sequence,
        "log_lines": [
            LogLine(at=format_time(START), level="INFO", logger="edgefleet.agent", message="up")
        ],
        "status": {"state": "idle"},
    }
    values.update(overrides)
    return DiagnosticsReport.model_validate(values)


def test_a_request_sends_a_signed_directive_after_the_commit_and_is_audited(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot
) -> None:
    add_device(database, "dev-1")
    publisher = RecordingPublisher()
    request = ask(database, issuer, publisher)
    [sent] = publisher.calls
    directive = verify_directive(sent.payload, trust, device_id="dev-1", last_sequence=0, now=START)
    assert directive.action == "diagnostics" and directive.request_id == request.id
    assert directive.sequence == request.directive_sequence and sent.qos == 1
    assert directive.expires_at == request.expires_at == START + TTL
    assert diagnostics_state(request, START) == "pending"
    with database.session() as session:
        [entry] = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "device.diagnose")
        ).all()
        assert (entry.actor, entry.target) == ("ops", "dev-1")
        assert entry.details == {
            "request_id": request.id,
            "directive_sequence": sequence_of(request),
        }


def test_a_directive_the_broker_did_not_take_leaves_the_request_failed(
    database: Database, issuer: DirectiveIssuer
) -> None:
    add_device(database, "dev-1")
    request = ask(database, issuer, RefusingPublisher())
    assert diagnostics_state(request, START) == "failed"
    assert request.error is not None and "not connected to the broker" in request.error
    with database.session() as session:
        [stored] = diagnostics_for(session, "dev-1")
        assert stored.error == request.error  # committed, not only in memory


def test_an_unknown_device_is_not_found_and_nothing_is_recorded(
    database: Database, issuer: DirectiveIssuer
) -> None:
    publisher = RecordingPublisher()
    with pytest.raises(NotFoundError), database.session() as session:
        request_diagnostics(session, issuer, publisher, "nope", OPERATOR, START)
    assert publisher.calls == []


def test_an_answer_is_stored_once_on_the_request_it_names(
    database: Database, issuer: DirectiveIssuer
) -> None:
    add_device(database, "dev-1")
    add_device(database, "dev-2")
    request = ask(database, issuer, RecordingPublisher())
    received = START + dt.timedelta(seconds=3)
    with database.session() as session:
        wrong = [
            ("dev-2", answer(request, device_id="dev-2")),  # another device's key
            ("dev-1", answer(request, directive_sequence=sequence_of(request) + 1)),
            ("dev-1", answer(request, request_id=request.id + 1)),
        ]
        assert [record_answer(session, d, a, received) for d, a in wrong] == [False] * 3
        assert record_answer(session, "dev-1", answer(request), received)
        second = answer(request, status={"state": "other"})
        assert not record_answer(session, "dev-1", second, received)
    with database.session() as session:
        [stored] = diagnostics_for(session, "dev-1")
        assert diagnostics_state(stored, received) == "answered"
        assert stored.answered_at == received
        assert stored.result is not None and stored.result["status"] == {"state": "idle"}
        assert stored.result["log_lines"][0]["message"] == "up"


def test_a_request_unanswered_by_its_expiry_is_expired_and_a_late_answer_is_dropped(
    database: Database, issuer: DirectiveIssuer
) -> None:
    add_device(database, "dev-1")
    request = ask(database, issuer, RecordingPublisher())
    assert diagnostics_state(request, START + TTL - dt.timedelta(seconds=1)) == "pending"
    assert diagnostics_state(request, START + TTL) == "expired"
    with database.session() as session:
        assert not record_answer(session, "dev-1", answer(request), START + TTL)
    with database.session() as session:
        [stored] = diagnostics_for(session, "dev-1")
        assert stored.result is None and diagnostics_state(stored, START + TTL) == "expired"
