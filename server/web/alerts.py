"""The alerts page /alerts: open alerts first, then resolved ones, filtered by kind and
device; operators acknowledge one with POST /alerts/{id}/ack (audited, as in the API)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from edgefleet.server.api.deps import ContextDep, SessionDep
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.drift.accuracy import ACCURACY_DROP
from edgefleet.server.drift.alerts import acknowledge_alert, list_alerts
from edgefleet.server.drift.evaluator import ALERT_KINDS
from edgefleet.server.errors import NotFoundError
from edgefleet.server.principals import Role
from edgefleet.server.web.auth import OperatorPage, ViewerPage
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

KINDS = (*ALERT_KINDS, ACCURACY_DROP)
SHOWN = 200  # alerts of each group (open, resolved) on the page


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerPage,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    device: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    kind, device = kind or None, device or None  # an empty field filters nothing
    if kind is not None and kind not in KINDS:
        raise PageError(422, f"{kind!r} is not an alert kind: choose one of {', '.join(KINDS)}")
    found = list_alerts(session, device=device, kind=kind, limit=2 * SHOWN)
    open_alerts = list_alerts(session, device=device, kind=kind, open_only=True, limit=SHOWN)
    resolved = [alert for alert in found if alert.resolved_at is not None][:SHOWN]
    return render(
        request,
        "alerts.html",
        open_alerts=open_alerts,
        resolved=resolved,
        kinds=KINDS,
        kind=kind or "",
        device=device or "",
        can_act=viewer.role.allows(Role.OPERATOR),
        section="alerts",
    )


@router.post("/alerts/{alert_id}/ack", response_class=HTMLResponse)
def acknowledge(
    alert_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    context: ContextDep,
    session: SessionDep,
    operator: OperatorPage,
) -> RedirectResponse:
    try:
        acknowledge_alert(session, alert_id, operator, context.clock())
    except NotFoundError:
        raise PageError(404, f"there is no alert {alert_id}: see the alerts") from None
    return RedirectResponse(f"/alerts#alert-{alert_id}", status_code=303)


__all__ = ["router"]
