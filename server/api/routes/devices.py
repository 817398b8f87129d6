"""Devices: the inventory, filtered and paged, and one device in detail (viewer);
removing a device (operator).

A device's detail adds its last status reports (the server keeps
`settings.status_reports_kept` per device) and a summary of its telemetry of
the last 24 hours per bundle version, read from the merged buckets.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from edgefleet.mqtt import is_valid_device_id
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import PRINTABLE
from edgefleet.server.api.schemas.devices import DeviceDetail, DeviceList, DevicePublic
from edgefleet.server.device_history import recent_status_reports, telemetry_summary
from edgefleet.server.devices import (
    count_devices,
    get_device,
    list_devices,
    remove_device,
)
from edgefleet.server.errors import InvalidRequestError, NotFoundError
from edgefleet.server.rollouts.selection import parse_selector
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

TELEMETRY_WINDOW = dt.timedelta(hours=24)
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
    rows = list_devices(session, online=online, tags=tags, model=model, limit=limit, offset=offset)
    total = count_devices(session, online=online, tags=tags, model=model)
    return DeviceList(items=[DevicePublic.model_validate(row) for row in rows], total=total)


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
    public = DevicePublic.model_validate(device)
    return DeviceDetail(
        **public.model_dump(),
        status_reports=recent_status_reports(
            session, device_id, context.settings.status_reports_kept
        ),
        telemetry=telemetry_summary(session, device_id, context.clock() - TELEMETRY_WINDOW),
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
    return Response(status_code=status.HTTP_204_NO_CONTENT)
