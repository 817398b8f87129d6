"""GET /alerts (viewer): drift alerts; POST /alerts/{id}/ack (operator, audited).

GET /alerts answers a page of alerts (`limit` after `offset`), newest first, and
the number over every page in the header `X-Total-Count`. A `kind` that is not
an alert kind is refused (422, naming the kinds), as the alerts page refuses it:
an empty list would read as "no such alerts".
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.alerts import AlertPublic
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.drift.accuracy import ACCURACY_DROP
from edgefleet.server.drift.alerts import acknowledge_alert, count_alerts, list_alerts
from edgefleet.server.drift.evaluator import ALERT_KINDS
from edgefleet.server.errors import InvalidRequestError
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/alerts", tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, le=MAX_ID)]
KINDS = (*ALERT_KINDS, ACCURACY_DROP)
TOTAL_HEADER = "X-Total-Count"


@router.get(
    "",
    response_model=list[AlertPublic],
    summary="Drift alerts, newest first; X-Total-Count says how many match over every page",
    responses=errors(),
)
def get_alerts(
    response: Response,
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
        str | None,
        Query(max_length=32, description="only alerts of this kind: " + ", ".join(KINDS)),
    ] = None,
    open_only: Annotated[
        bool, Query(alias="open", description="only alerts not resolved yet")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many")] = 0,
) -> list[AlertPublic]:
    if kind is not None and kind not in KINDS:
        raise InvalidRequestError(
            f"kind {kind!r} is not an alert kind: choose one of {', '.join(KINDS)}"
        )
    filters: dict[str, Any] = {
        "device": device,
        "cohort": cohort,
        "bundle": bundle,
        "version": version,
        "kind": kind,
        "open_only": open_only,
    }
    rows = list_alerts(session, **filters, limit=limit, offset=offset)
    total = count_alerts(session, **filters)  # the same filters, over every page
    response.headers[TOTAL_HEADER] = str(total)
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
