"""GET /alerts (viewer): drift alerts; POST /alerts/{id}/ack (operator, audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.alerts import AlertPublic
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.drift.alerts import acknowledge_alert, list_alerts
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/alerts", tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get(
    "",
    response_model=list[AlertPublic],
    summary="Drift alerts, newest first",
    responses=errors(),
)
def get_alerts(
    session: SessionDep,
    _viewer: ViewerDep,
    device: Annotated[
        str | None, Query(max_length=128, description="only this device's alerts")
    ] = None,
    cohort: Annotated[
        str | None,
        Query(
            max_length=256,
            description='only this cohort\'s alerts, exactly: "version", "tag:KEY=VALUE", '
            '"profile:PROFILE" or "stage:ROLLOUT_ID/STAGE_INDEX"',
        ),
    ] = None,
    bundle: Annotated[
        str | None, Query(max_length=128, description="only alerts of this bundle name")
    ] = None,
    version: Annotated[
        str | None, Query(max_length=64, description="only alerts of this bundle version")
    ] = None,
    kind: Annotated[
        str | None, Query(max_length=32, description="only alerts of this kind")
    ] = None,
    open_only: Annotated[
        bool, Query(alias="open", description="only alerts not resolved yet")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AlertPublic]:
    rows = list_alerts(
        session,
        device=device,
        cohort=cohort,
        bundle=bundle,
        version=version,
        kind=kind,
        open_only=open_only,
        limit=limit,
    )
    return [AlertPublic.model_validate(row) for row in rows]


@router.post(
    "/{alert_id}/ack",
    response_model=AlertPublic,
    summary="Acknowledge an alert: someone has seen it (it stays open until it resolves)",
    responses=errors(404),
)
def ack_alert(
    alert_id: AlertId, session: SessionDep, context: ContextDep, operator: OperatorDep
) -> AlertPublic:
    return AlertPublic.model_validate(
        acknowledge_alert(session, alert_id, operator, context.clock())
    )
