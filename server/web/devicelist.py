"""The device list at `/devices`: filtered, sorted and paged by the database.

Query parameters (all optional, all kept in the page's links):
    tag=K=V      devices carrying the tag (repeatable: every one)
    model=M      serving model M ("name" or "name@version")
    health=H     ok, degraded, failing or unknown: the model's health from telemetry
                 (`Device.health`); each row shows the device's verdict beside it
    online=yes|no
    sort=id|last_seen|version|health   id ascending, last seen newest first,
                 version by model name then version, health worst first; ties by id
    page=N       50 devices a page, from 1
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import ContextDep
from edgefleet.server.api.routes.devices import parse_tag_filters
from edgefleet.server.db.models import Device
from edgefleet.server.devices import device_filters
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.history import HealthVerdict, health_verdicts
from edgefleet.server.web.auth import ViewerPage
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
HEALTH_STATES = ("failing", "degraded", "unknown", "ok")  # worst first
SORTS = ("id", "last_seen", "version", "health")

_HEALTH_RANK = case(
    {state: rank for rank, state in enumerate(HEALTH_STATES)},
    value=Device.health,
    else_=len(HEALTH_STATES),
)
_ORDER: dict[str, tuple[Any, ...]] = {
    "id": (Device.id,),
    "last_seen": (Device.last_seen.desc().nulls_last(), Device.id),
    "version": (Device.model_name.nulls_last(), Device.model_version.nulls_last(), Device.id),
    "health": (_HEALTH_RANK, Device.id),
}


@dataclass(frozen=True)
class DeviceQuery:
    """What the list shows: filters, order, page."""

    tags: dict[str, str]
    model: str | None = None
    health: str | None = None
    online: bool | None = None
    sort: str = "id"
    page: int = 1

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions = device_filters(self.online, self.tags, self.model)
        if self.health:
            conditions.append(Device.health == self.health)
        return conditions

    def link(self, **changes: Any) -> str:
        """This list's URL with `changes` (a filter change goes back to page 1)."""
        values = {
            "tag": [f"{k}={v}" for k, v in self.tags.items()],
            "model": self.model,
            "health": self.health,
            "online": {True: "yes", False: "no", None: None}[self.online],
            "sort": self.sort,
            "page": self.page,
        }
        values.update(changes)
        defaults = {"sort": "id", "page": 1}
        kept = [
            (k, v) for k, v in values.items() if v not in (None, [], "") and defaults.get(k) != v
        ]
        return "/devices" + ("?" + urlencode(kept, doseq=True) if kept else "")


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    verdicts: dict[str, HealthVerdict]  # per device id of the page
    total: int
    pages: int


def parse_query(params: Mapping[str, str], tags: list[str]) -> DeviceQuery:
    """The list's query from the request's parameters.

    Raises:
        PageError: 422 for a malformed tag, an unknown health, online or sort, a bad page.
    """
    try:
        tag_filters = parse_tag_filters([tag for tag in tags if tag.strip()])
    except InvalidRequestError as exc:
        raise PageError(422, f"{exc}: write tags as KEY=VALUE, e.g. site=berlin") from None
    health = params.get("health") or None
    if health is not None and health not in HEALTH_STATES:
        raise PageError(422, f"health {health!r} is not one of {', '.join(HEALTH_STATES)}")
    online_text = params.get("online") or ""
    if online_text not in ("", "yes", "no"):
        raise PageError(422, f"online {online_text!r} is not yes or no")
    sort = params.get("sort") or "id"
    if sort not in SORTS:
        raise PageError(422, f"sort {sort!r} is not one of {', '.join(SORTS)}")
    page_text = params.get("page") or "1"
    if not page_text.isdigit() or int(page_text) < 1:
        raise PageError(422, f"page {page_text!r} is not a page number (1, 2, ...)")
    return DeviceQuery(
        tags=tag_filters,
        model=(params.get("model") or "").strip() or None,
        health=health,
        online={"": None, "yes": True, "no": False}[online_text],
        sort=sort,
        page=int(page_text),
    )


def device_page(session: Session, query: DeviceQuery, now: dt.datetime) -> DevicePage:
    """One page of the devices matching `query` with their verdicts, and how many match."""
    conditions = query.conditions()
    total = int(session.scalar(select(func.count()).select_from(Device).where(*conditions)) or 0)
    devices = list(
        session.scalars(
            select(Device)
            .where(*conditions)
            .order_by(*_ORDER[query.sort])
            .limit(PAGE_SIZE)
            .offset((query.page - 1) * PAGE_SIZE)
        )
    )
    verdicts = health_verdicts(session, devices, now)
    return DevicePage(devices, verdicts, total, max(1, math.ceil(total / PAGE_SIZE)))


@router.get("/devices")
def device_list_page(request: Request, context: ContextDep, _user: ViewerPage) -> HTMLResponse:
    query = parse_query(request.query_params, request.query_params.getlist("tag"))
    with context.db.session() as session:
        page = device_page(session, query, context.clock())
    return render(
        request,
        "devices.html",
        section="devices",
        query=query,
        page=page,
        health_states=HEALTH_STATES,
        sorts=SORTS,
    )


__all__ = ["PAGE_SIZE", "DevicePage", "DeviceQuery", "device_page", "parse_query", "router"]
