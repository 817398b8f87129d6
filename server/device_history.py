"""A device's recent history for the API's device detail: status reports and telemetry.

Reads only; both are bounded aggregates (the last few status reports kept per
device, telemetry merged into buckets), so these queries stay small.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.server.api.schemas.devices import StatusReportPublic, TelemetrySummary
from edgefleet.server.db.models import StatusReportRow, TelemetryBucket


def recent_status_reports(session: Session, device_id: str, limit: int) -> list[StatusReportPublic]:
    """The device's last `limit` status reports, highest sequence first."""
    rows = session.scalars(
        select(StatusReportRow)
        .where(StatusReportRow.device_id == device_id)
        .order_by(StatusReportRow.sequence.desc())
        .limit(limit)
    )
    return [StatusReportPublic.model_validate(row) for row in rows]


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


__all__ = ["recent_status_reports", "telemetry_summary"]
