"""The device page /devices/{id}: "is this device and its model all right, and if not, why".

Identity and inventory, the health verdict with its reasons, online history,
heartbeat figures over time (server-drawn SVG), what the agent last reported
of its links, breakers, trust root and floors, the model in service and the
previous one, the install history in words, the model's figures per version
against the previous one, drift per feature, open alerts, and diagnostics
(operators ask for them with POST /devices/{id}/diagnostics).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from edgefleet.mqtt import is_valid_device_id
from edgefleet.server.api.deps import ContextDep, SessionDep
from edgefleet.server.db.models import Device
from edgefleet.server.deadletters import describe_dropped, list_dead_letters
from edgefleet.server.device_history import recent_status_reports
from edgefleet.server.devices import get_device
from edgefleet.server.diagnostics import (
    diagnostics_for,
    diagnostics_state,
    request_diagnostics,
)
from edgefleet.server.drift.alerts import list_alerts
from edgefleet.server.errors import NotFoundError
from edgefleet.server.history import (
    describe_age,
    device_health_verdict,
    heartbeat_series,
    presence_history,
)
from edgefleet.server.principals import Role
from edgefleet.server.web import units
from edgefleet.server.web.auth import OperatorPage, ViewerPage
from edgefleet.server.web.charts import Series, line_chart
from edgefleet.server.web.devicedata import drift_checks, install_state_words, version_figures
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

DeviceId = Annotated[str, Path(max_length=128)]
CHART_PERIOD = dt.timedelta(hours=24)  # heartbeat charts and the model's figures
PRESENCE_PERIOD = dt.timedelta(days=7)
SHOWN_ALERTS = 50
SHOWN_DIAGNOSTICS = 3
SHOWN_DEAD_LETTERS = 5
MAX_LOG_LINES = 200  # of a diagnostics answer, shown in a <pre>


def _device(session: SessionDep, device_id: str) -> Device:
    """Raises: PageError (404) for an unknown or malformed id."""
    try:
        if not is_valid_device_id(device_id):
            raise NotFoundError(device_id)
        return get_device(session, device_id)
    except NotFoundError:
        raise PageError(
            404, f"there is no device {device_id[:128]!r}: see the device list"
        ) from None


def heartbeat_charts(session: SessionDep, device_id: str, now: dt.datetime) -> list[object]:
    """CPU, memory, free disk and temperature over `CHART_PERIOD`, as SVG charts."""
    points = heartbeat_series(session, device_id, now - CHART_PERIOD, now)
    times = [point.at for point in points]
    memory_total = max((point.memory_total for point in points), default=0)
    disk_total = max((point.disk_total for point in points), default=0)
    gib = 1024**3
    return [
        line_chart(Series("CPU (average)", "%", times, [p.cpu_avg for p in points], ceiling=100)),
        line_chart(
            Series(
                "Memory used",
                "GiB",
                times,
                [p.memory_used_avg / gib for p in points],
                ceiling=memory_total / gib or None,
            )
        ),
        line_chart(
            Series(
                "Disk free (lowest)",
                "GiB",
                times,
                [p.disk_free_min / gib for p in points],
                ceiling=disk_total / gib or None,
            )
        ),
        line_chart(
            Series("Temperature (highest)", "°C", times, [p.temperature_max for p in points])
        ),
    ]


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(
    request: Request,
    device_id: DeviceId,
    context: ContextDep,
    session: SessionDep,
    viewer: ViewerPage,
) -> HTMLResponse:
    device = _device(session, device_id)
    now = context.clock()
    alerts = list_alerts(session, device=device.id, open_only=True, limit=SHOWN_ALERTS)
    return render(
        request,
        "device.html",
        device=device,
        heartbeat=device.heartbeat or {},
        verdict=device_health_verdict(device, now),
        presence=presence_history(session, device.id, now - PRESENCE_PERIOD),
        charts=heartbeat_charts(session, device.id, now),
        reports=recent_status_reports(session, device.id, context.settings.status_reports_kept),
        state_words=install_state_words,
        uptime=lambda seconds: describe_age(dt.timedelta(seconds=seconds)),
        figures=version_figures(session, device, now - CHART_PERIOD),
        drift=drift_checks(session, device),
        evidence={
            (a.kind, a.feature or ""): a.evidence
            for a in alerts
            if (a.bundle_name, a.bundle_version) == (device.model_name, device.model_version)
        },
        alerts=alerts,
        dead_letters=list_dead_letters(session, device.id, SHOWN_DEAD_LETTERS),
        describe_dropped=describe_dropped,
        diagnostics=diagnostics_for(session, device.id, limit=SHOWN_DIAGNOSTICS),
        diagnostics_state=lambda asked: diagnostics_state(asked, now),
        max_log_lines=MAX_LOG_LINES,
        units=units,
        can_act=viewer.role.allows(Role.OPERATOR),
        section="devices",
    )


@router.post("/devices/{device_id}/diagnostics", response_class=HTMLResponse)
def ask_diagnostics(
    device_id: DeviceId,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorPage,
) -> RedirectResponse:
    device = _device(session, device_id)
    if context.issuer is None:
        raise PageError(409, "this server holds no server key: it cannot sign directives")
    request_diagnostics(
        session, context.issuer, context.publisher, device.id, operator, context.clock()
    )
    return RedirectResponse(f"/devices/{device.id}#diagnostics", status_code=303)


__all__ = ["router"]
