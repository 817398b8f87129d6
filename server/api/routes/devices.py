"""Devices: the inventory, filtered and paged, and one device in detail (viewer);
removing a device (operator).

Every device comes with its health verdict (`edgefleet.server.history`). A
device's detail adds its last status reports (the server keeps
`settings.status_reports_kept` per device) and a summary of its telemetry of
the last 24 hours per bundle version, read from the merged buckets; its
history, heartbeats over time and presence changes, is a route of its own.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from edgefleet.mqtt import is_valid_device_id
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import PRINTABLE
from edgefleet.server.api.schemas.devices import (
    DeviceDetail,
    DeviceHistory,
    DeviceList,
    DevicePublic,
    HeartbeatPointPublic,
    PresenceChangePublic,
    VerdictPublic,
)
from edgefleet.server.db.models import Device
from edgefleet.server.device_history import recent_status_reports, telemetry_summary
from edgefleet.server.devices import (
    count_devices,
    get_device,
    list_devices,
    remove_device,
)
from edgefleet.server.errors import InvalidRequestError, NotFoundError
from edgefleet.server.history import (
    HealthVerdict,
    device_health_verdict,
    health_verdicts,
    heartbeat_series,
    point_resolution,
    presence_history,
)
from edgefleet.server.rollouts.selection import parse_selector
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

TELEMETRY_WINDOW = dt.timedelta(hours=24)
HISTORY_WINDOW = dt.timedelta(hours=24)  # a history's default span
MAX_TAG_FILTERS = 16


def parse_tag_filters(tags: list[str]) -> dict[str, str]:
    """`["site=berlin", "line=3"]` -> {"site": "berlin", "line": "3"}: the pairs of a
    rollout selector (`parse_selector`'s rules, `edgefleet.server.tags`), one per item.

    Raises:
        InvalidRequestError: more than `MAX_TAG_FILTERS` items, an item that is not
            one `name=value`, a name or value outside the tag rules, or a repeated name.
    """
    if len(tags) > MAX_TAG_FILTERS:
        raise InvalidRequestError(f"at most {MAX_TAG_FILTERS} tag filters")
    for item in tags:
        if "," in item:  # a selector's separator: one pair per filter
            raise InvalidRequestError(f"tag filter {item[:80]!r} is not one name=value")
    return parse_selector(",".join(tags))


@router.get(
    "",
    response_model=DeviceList,
    summary="Enrolled devices, by id, filtered and paged",
    responses=errors(),
)
def get_devices(
    context: ContextDep,
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
    tags = parse_tag_filters(tag) or None
    if model is not None and "@" in model:
        name, _, version = model.partition("@")
        if not name or not version:
            raise InvalidRequestError(
                f"model {model!r}: give NAME or NAME@VERSION, e.g. demo or demo@1.2.0"
            )
    rows = list_devices(session, online=online, tags=tags, model=model, limit=limit, offset=offset)
    total = count_devices(session, online=online, tags=tags, model=model)
    verdicts = health_verdicts(session, rows, context.clock())
    return DeviceList(items=[_public(row, verdicts[row.id]) for row in rows], total=total)


def _public(device: Device, verdict: HealthVerdict) -> DevicePublic:
    public = DevicePublic.model_validate(device)
    public.verdict = VerdictPublic(state=verdict.state, reasons=verdict.reasons)
    return public


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
    public = _public(device, device_health_verdict(device, context.clock()))
    return DeviceDetail(
        **public.model_dump(),
        status_reports=recent_status_reports(
            session, device_id, context.settings.status_reports_kept
        ),
        telemetry=telemetry_summary(session, device_id, context.clock() - TELEMETRY_WINDOW),
    )


@router.get(
    "/{device_id}/history",
    response_model=DeviceHistory,
    summary="One device's heartbeats over time and its presence changes",
    description=(
        "From `since` (default: 24 hours ago) to `until` (default: now), both with a "
        "time zone. Heartbeats come in at most about 1500 points: the finest resolution "
        "that fits (1 minute for a day, 15 minutes for a week, 1 hour for a month), or "
        "the stored one where older history is coarser."
    ),
    responses=errors(404),
)
def get_device_history(
    device_id: Annotated[str, Path(max_length=128)],
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> DeviceHistory:
    if not is_valid_device_id(device_id):
        raise NotFoundError(f"no device {device_id[:128]!r}")
    if any(t is not None and t.tzinfo is None for t in (since, until)):
        raise InvalidRequestError("since and until need a time zone, e.g. 2026-12-01T12:00:00Z")
    until = until or context.clock()
    since = since or until - HISTORY_WINDOW
    if since >= until:
        raise InvalidRequestError("since must be before until")
    get_device(session, device_id)  # 404 for an unknown device
    points = heartbeat_series(session, device_id, since, until)
    changes = [c for c in presence_history(session, device_id, since) if c.at < until]
    return DeviceHistory(
        device_id=device_id,
        since=since,
        until=until,
        resolution_s=point_resolution(since, until),
        points=[HeartbeatPointPublic.model_validate(p, from_attributes=True) for p in points],
        presence=[PresenceChangePublic.model_validate(change) for change in changes],
    )


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove a device: its enrollment (key), state, reports and telemetry",
    description=(
        "The device's messages are refused from now on, and the id may enroll again "
        "(e.g. re-flashed, with a new key). Refused with 409 while the device is part of "
        "a running, paused or aborting rollout."
    ),
    responses=errors(404, 409),
)
def delete_device(
    device_id: Annotated[str, Path(max_length=128)],
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
) -> Response:
    if not is_valid_device_id(device_id):
        raise NotFoundError(f"no device {device_id[:128]!r}")
    remove_device(session, device_id, operator, now=context.clock())
    session.commit()  # before the key cache forgets: ingestion must not reload the old key
    if context.device_keys is not None:
        context.device_keys.invalidate(device_id)
    if context.crl is not None:
        context.crl.after_removal()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
