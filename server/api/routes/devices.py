"""Devices (viewer): the inventory, filtered and paged, and one device in detail.

A device's detail adds its last status reports (the server keeps
`settings.status_reports_kept` per device) and a summary of its telemetry of
the last 24 hours per bundle version, read from the merged buckets.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.mqtt import is_valid_device_id
from edgefleet.server.api.deps import ContextDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.routes import API_PREFIX
from edgefleet.server.api.schemas import PRINTABLE
from edgefleet.server.db.models import StatusReportRow, TelemetryBucket
from edgefleet.server.devices import (
    TAG_NAME_PATTERN,
    DevicePublic,
    count_devices,
    get_device,
    list_devices,
)
from edgefleet.server.errors import InvalidRequestError, NotFoundError

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

TELEMETRY_WINDOW = dt.timedelta(hours=24)
MAX_TAG_FILTERS = 16


class DeviceList(BaseModel):
    items: list[DevicePublic]
    total: int


class StatusReportPublic(BaseModel):
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


class DeviceDetail(DevicePublic):
    status_reports: list[StatusReportPublic]
    telemetry: list[TelemetrySummary]


def parse_tag_filters(tags: list[str]) -> dict[str, str]:
    """`["site=berlin", "line=3"]` -> {"site": "berlin", "line": "3"}.

    Raises:
        InvalidRequestError: an item is not `name=value`, or a name repeats.
    """
    if len(tags) > MAX_TAG_FILTERS:
        raise InvalidRequestError(f"at most {MAX_TAG_FILTERS} tag filters")
    parsed: dict[str, str] = {}
    for item in tags:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidRequestError(f"tag filter {item[:80]!r} is not name=value")
        if re.fullmatch(TAG_NAME_PATTERN, name.strip()) is None:
            raise InvalidRequestError(f"tag name {name.strip()[:80]!r} is not a tag name")
        if name.strip() in parsed:
            raise InvalidRequestError(f"tag {name.strip()!r} is given twice")
        parsed[name.strip()] = value.strip()
    return parsed


@router.get(
    "",
    response_model=DeviceList,
    summary="Enrolled devices, by id, filtered and paged",
    responses=errors(),
)
def get_devices(
    session: SessionDep,
    _viewer: ViewerDep,
    online: bool | None = None,
    tag: Annotated[
        list[str], Query(description="name=value, repeatable", max_length=MAX_TAG_FILTERS)
    ] = [],  # noqa: B006 - FastAPI copies defaults
    model: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> DeviceList:
    for item in tag:
        if len(item) > 300 or any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise InvalidRequestError("a tag filter must be printable and at most 300 characters")
    tags = parse_tag_filters(tag) or None
    rows = list_devices(session, online=online, tags=tags, model=model, limit=limit, offset=offset)
    total = count_devices(session, online=online, tags=tags, model=model)
    return DeviceList(items=[DevicePublic.from_row(row) for row in rows], total=total)


def _status_reports(session: Session, device_id: str, limit: int) -> list[StatusReportPublic]:
    rows = session.scalars(
        select(StatusReportRow)
        .where(StatusReportRow.device_id == device_id)
        .order_by(StatusReportRow.sequence.desc())
        .limit(limit)
    )
    return [
        StatusReportPublic(
            sequence=row.sequence,
            received_at=row.received_at,
            sent_at=row.sent_at,
            install_state=row.install_state,
            bundle_name=row.bundle_name,
            bundle_version=row.bundle_version,
            directive_sequence=row.directive_sequence,
            reason=row.reason,
        )
        for row in rows
    ]


def _telemetry(session: Session, device_id: str, since: dt.datetime) -> list[TelemetrySummary]:
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
    for name, version, windows, requests, errors_, fallbacks, violations in session.execute(query):
        requests = int(requests or 0)
        out.append(
            TelemetrySummary(
                bundle_name=name,
                bundle_version=version,
                since=since,
                windows=int(windows or 0),
                requests=requests,
                errors=int(errors_ or 0),
                fallbacks=int(fallbacks or 0),
                schema_violations=int(violations or 0),
                error_rate=int(errors_ or 0) / requests if requests else None,
                fallback_rate=int(fallbacks or 0) / requests if requests else None,
            )
        )
    return out


@router.get(
    "/{device_id}",
    response_model=DeviceDetail,
    summary="One device: inventory, state, last status reports, recent telemetry",
    responses=errors(404),
)
def get_one_device(
    device_id: Annotated[str, Path(max_length=128)],
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
) -> DeviceDetail:
    if not is_valid_device_id(device_id):
        raise NotFoundError(f"no device {device_id[:128]!r}")
    device = get_device(session, device_id)
    public = DevicePublic.from_row(device)
    return DeviceDetail(
        **public.model_dump(),
        status_reports=_status_reports(session, device_id, context.settings.status_reports_kept),
        telemetry=_telemetry(session, device_id, context.clock() - TELEMETRY_WINDOW),
    )
