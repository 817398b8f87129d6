"""Diagnostics requests: where each stands and, once answered, the device's log lines and
status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from edgefleet.server.db.models import DiagnosticsRequest
from edgefleet.server.diagnostics import DiagnosticsState, diagnostics_state


class LogLineView(BaseModel):
    at: str
    level: str
    logger: str
    message: str


class DiagnosticsAnswer(BaseModel):
    """What the device sent: its recent log lines (oldest first) and its status."""

    sent_at: str
    log_lines: list[LogLineView]
    status: dict[str, Any]


class DiagnosticsRequestPublic(BaseModel):
    """One request: pending until answered, expired at `expires_at`, failed when its
    directive could not be sent (`error` says why)."""

    id: int
    device_id: str
    state: DiagnosticsState
    requested_by: str
    requested_at: dt.datetime
    expires_at: dt.datetime
    directive_sequence: int | None  # the directive's, as the device's log names it
    answered_at: dt.datetime | None
    error: str | None
    answer: DiagnosticsAnswer | None

    @classmethod
    def of(cls, request: DiagnosticsRequest, now: dt.datetime) -> DiagnosticsRequestPublic:
        return cls(
            id=request.id,
            device_id=request.device_id,
            state=diagnostics_state(request, now),
            requested_by=request.requested_by,
            requested_at=request.requested_at,
            expires_at=request.expires_at,
            directive_sequence=request.directive_sequence,
            answered_at=request.answered_at,
            error=request.error,
            answer=None if request.result is None else DiagnosticsAnswer(**request.result),
        )


class DiagnosticsList(BaseModel):
    """A device's most recent requests, newest first."""

    items: list[DiagnosticsRequestPublic]
