"""Diagnostics on request: a device's recent log lines and full status, asked for and kept.

An operator asks (`request_diagnostics`): a `DiagnosticsRequest` row is added,
a signed `diagnostics` directive is prepared in the same unit of work (its
sequence taken from the device's like every directive's), the unit of work
commits (with its audit entry, `device.diagnose`), and only then is the
directive published; one the broker did not take leaves the row failed with
the reason. The device answers on its diagnostics topic; ingestion hands the
verified answer to `record_answer`, which stores it on the row (once: a second
answer changes nothing). A request not answered by its `expires_at`
(`settings.diagnostics_ttl` after it was asked; the directive expires then
too, so the device no longer answers) reads as expired.

Invariants: an answer is stored only on the request row it names, of the
device whose key signed it, with the directive sequence the request was sent
with; the answer's size is bounded before it is parsed (`MAX_DIAGNOSTICS_BYTES`,
in ingestion), so the table holds nothing larger.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.errors import PublishError
from edgefleet.mqtt.messages import DiagnosticsReport
from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import DiagnosticsRequest
from edgefleet.server.devices import get_device
from edgefleet.server.directives import DirectiveIssuer, publish_directive
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.principals import Principal

DiagnosticsState = Literal["pending", "answered", "expired", "failed"]
AUDIT_ACTION = "device.diagnose"
MAX_LISTED = 50


def diagnostics_state(request: DiagnosticsRequest, now: dt.datetime) -> DiagnosticsState:
    """Where `request` stands at `now`: answered, failed (not sent), expired or pending."""
    if request.answered_at is not None:
        return "answered"
    if request.error is not None:
        return "failed"
    if now >= request.expires_at:
        return "expired"
    return "pending"


def request_diagnostics(
    session: Session,
    issuer: DirectiveIssuer,
    publisher: Publisher,
    device_id: str,
    actor: Principal,
    now: dt.datetime,
) -> DiagnosticsRequest:
    """Ask `device_id` for its log lines and status; returns the request row.

    Commits `session` (the row, the directive's sequence and the audit entry)
    before publishing, as every directive is published after its unit of work;
    a directive the broker did not take is recorded in the row's `error` and
    committed too.

    Raises:
        NotFoundError: no such device.
        StorageError: (from the session) the database failed.
    """
    device = get_device(session, device_id)
    request = DiagnosticsRequest(
        device_id=device.id,
        requested_by=actor.name,
        requested_at=now,
        expires_at=now + issuer.settings.diagnostics_ttl,
    )
    session.add(request)
    session.flush()  # the row's id goes into the directive
    directive = issuer.prepare_diagnostics(session, device, request.id)
    request.directive_sequence = directive.sequence
    if directive.expires_at is not None:
        request.expires_at = directive.expires_at
    record_audit(
        session,
        actor,
        AUDIT_ACTION,
        device.id,
        {"request_id": request.id, "directive_sequence": directive.sequence},
        now=now,
    )
    session.commit()
    try:
        publish_directive(publisher, directive)
    except PublishError as exc:
        request.error = f"the directive was not published (the broker did not take it): {exc}"
        session.commit()
    return request


def diagnostics_for(session: Session, device_id: str, limit: int = 5) -> list[DiagnosticsRequest]:
    """The device's most recent diagnostics requests with their answers, newest first."""
    query = (
        select(DiagnosticsRequest)
        .where(DiagnosticsRequest.device_id == device_id)
        .order_by(DiagnosticsRequest.id.desc())
        .limit(max(1, min(limit, MAX_LISTED)))
    )
    return list(session.scalars(query))


def record_answer(
    session: Session, device_id: str, report: DiagnosticsReport, received_at: dt.datetime
) -> bool:
    """Store `report` (verified as sent by `device_id`) on the request it answers.

    Returns False, storing nothing, when no unanswered request of that device
    has the report's id and directive sequence, or the request expired before
    the answer arrived.
    """
    request = session.get(DiagnosticsRequest, report.request_id)
    if (
        request is None
        or request.device_id != device_id
        or request.directive_sequence != report.directive_sequence
        or request.answered_at is not None
        or received_at >= request.expires_at
    ):
        return False
    request.answered_at = received_at
    request.result = answer_document(report)
    return True


def answer_document(report: DiagnosticsReport) -> dict[str, Any]:
    """What is kept of an answer: when the device sent it, its log lines and status."""
    return {
        "sent_at": report.sent_at,
        "log_lines": [line.model_dump() for line in report.log_lines],
        "status": report.status,
    }


__all__ = [
    "AUDIT_ACTION",
    "DiagnosticsState",
    "answer_document",
    "diagnostics_for",
    "diagnostics_state",
    "record_answer",
    "request_diagnostics",
]
