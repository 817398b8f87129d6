"""The rollout pages: /rollouts (newest first) and /rollouts/{id} (stages, gate values
with their thresholds, devices, transitions), with pause, resume and abort for operators.

An action calls the same service function as the API (audited there, in the
same unit of work) and sends the browser back to the rollout's page.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from edgefleet.server.api.deps import ContextDep, SessionDep
from edgefleet.server.api.routes.rollouts import status_of
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.bundles import bundle_labels
from edgefleet.server.db.models import RolloutDevice
from edgefleet.server.errors import ConflictError, NotFoundError
from edgefleet.server.principals import Role
from edgefleet.server.rollouts.service import (
    abort_rollout,
    list_rollouts,
    pause_rollout,
    resume_rollout,
)
from edgefleet.server.web.auth import OperatorPage, ViewerPage, read_form
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

RolloutId = Annotated[int, Path(ge=1, le=MAX_ID)]
MAX_REASON = 500  # characters of an operator's reason
SHOWN_DEVICES = 500  # devices listed on a rollout's page

ACTIONS = {"pause": pause_rollout, "resume": resume_rollout, "abort": abort_rollout}


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, session: SessionDep, _viewer: ViewerPage) -> HTMLResponse:
    rollouts = list_rollouts(session)
    labels = bundle_labels(session, (r.bundle_id for r in rollouts))
    return render(request, "rollouts.html", rollouts=rollouts, labels=labels, section="rollouts")


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(
    request: Request,
    rollout_id: RolloutId,
    context: ContextDep,
    session: SessionDep,
    viewer: ViewerPage,
) -> HTMLResponse:
    try:
        status = status_of(session, context, rollout_id)
    except NotFoundError:
        raise PageError(
            404, f"there is no rollout {rollout_id}: see the list of rollouts"
        ) from None
    devices = session.scalars(
        select(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id)
        .order_by(RolloutDevice.stage_index, RolloutDevice.device_id)
        .limit(SHOWN_DEVICES)
    ).all()
    return render(
        request,
        "rollout.html",
        rollout=status,
        devices=devices,
        shown_devices=SHOWN_DEVICES,
        can_act=viewer.role.allows(Role.OPERATOR),
        section="rollouts",
    )


@router.post("/rollouts/{rollout_id}/{action}", response_class=HTMLResponse)
async def rollout_action(
    request: Request,
    rollout_id: RolloutId,
    action: Annotated[str, Path(pattern="^(pause|resume|abort)$")],
    context: ContextDep,
    session: SessionDep,
    operator: OperatorPage,
) -> RedirectResponse:
    reason = (await read_form(request)).get("reason", "").strip()[:MAX_REASON] or None
    if action == "abort" and reason is None:
        raise PageError(400, "say why the rollout is aborted: the reason is recorded")
    try:
        ACTIONS[action](session, rollout_id, operator, reason, context.clock())
    except NotFoundError:
        raise PageError(
            404, f"there is no rollout {rollout_id}: see the list of rollouts"
        ) from None
    except ConflictError as exc:  # the rollout's state does not allow it (anymore)
        raise PageError(409, f"{exc}: reload the page to see its state") from None
    return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)


__all__ = ["router"]
