"""A device's recent history for the API's device detail: status reports and telemetry.

Reads only; both are bounded aggregates (the last few status reports kept per
device, telemetry merged into buckets), so these queries stay small.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import StatusReportRow, TelemetryBucket


class StatusReportPublic(BaseModel):
    """One stored status report of a device."""

    sequence: int
    received_at: dt.datetime
    sent_at: dt.datetime
    install_state: str
    bundle_name: str | None
    bundle_version: str | None
    directive_sequence: int | None
    reason: str | None


class TelemetrySummary(BaseModel):
    """One bundle version's telemetry of the device over `since`..now."""

    bundle_name: str
    bundle_version: str
    since: dt.datetime
    windows: int
    requests: int
    errors: int
    fallbacks: int
    schema_violations: int
    error_rate: float | None
    fallback_rate: float | None


def recent_status_reports(session: Session, device_id: str, limit: int) -> list[StatusReportPublic]:
    """The device's last `limit` status reports, highest sequence first."""
    rows = session.scalars(
        select(StatusReportRow)
        .where(StatusReportRow.device_id == device_id)
        .order_by(StatusReportRow.sequence.desc())
        .limit(limit)
    )
    return [StatusReportPublic.model_validate(row, from_attributes=True) for row in rows]


def telemetry_summary(
    session: Session, device_id: str, since: dt.datetime
) -> list[TelemetrySummary]:
    """The device's telemetry buckets from `since` on, summed per bundle version."""
    query = (
        select(
            TelemetryBucket.bundle_name,
            TelemetryBucket.bundle_version,
            func.sum(TelemetryBucket.windows),
            func.sum(TelemetryBucket.requests),
            func.sum(TelemetryBucket.errors),
            func.sum(TelemetryBucket.fallbacks),
            func.sum(TelemetryBucket.schema_violations),
        )
        .where(TelemetryBucket.device_id == device_id, TelemetryBucket.bucket_start >= since)
        .group_by(TelemetryBucket.bundle_name, TelemetryBucket.bundle_version)
        .order_by(TelemetryBucket.bundle_name, TelemetryBucket.bundle_version)
    )
    out = []
    for name, version, *sums in session.execute(query):
        windows, requests, errors, fallbacks, violations = (int(n or 0) for n in sums)
        out.append(
            TelemetrySummary(
                bundle_name=name,
                bundle_version=version,
                since=since,
                windows=windows,
                requests=requests,
                errors=errors,
                fallbacks=fallbacks,
                schema_violations=violations,
                error_rate=errors / requests if requests else None,
                fallback_rate=fallbacks / requests if requests else None,
            )
        )
    return out


__all__ = ["StatusReportPublic", "TelemetrySummary", "recent_status_reports", "telemetry_summary"]
