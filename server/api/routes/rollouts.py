"""Rollouts: start, list, status (viewer), pause, resume, abort (operator).

The API only records decisions: starting a rollout stores it with its first
stage's devices, and pause/resume/abort move its state (each audited and
recorded as a transition by `edgefleet.server.rollouts.service`). Directives
are sent by the rollout driver on its next tick, never from a request.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, status
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.rollouts import (
    RolloutAction,
    RolloutCreate,
    RolloutStatus,
    RolloutSummary,
)
from edgefleet.server.bundles import bundle_labels
from edgefleet.server.context import ServerContext
from edgefleet.server.principals import Principal
from edgefleet.server.rollouts.machine import RolloutState
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.selection import parse_selector
from edgefleet.server.rollouts.service import (
    abort_rollout,
    list_rollouts,
    pause_rollout,
    resume_rollout,
    rollout_status,
    start_rollout,
)
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/rollouts", tags=["rollouts"])

RolloutId = Annotated[int, Path(ge=1, le=MAX_ID)]
ActionBody = Annotated[RolloutAction | None, Body()]
STATES = tuple(s.value for s in RolloutState if s is not RolloutState.CREATED)


@router.post(
    "",
    response_model=RolloutStatus,
    status_code=status.HTTP_201_CREATED,
    summary="Start rolling a bundle out to the selected devices, stage by stage",
    responses=errors(404, 409),
)
def create_rollout(
    body: RolloutCreate, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> RolloutStatus:
    name, _, version = body.bundle.rpartition("@")
    bundle = context.bundles.get(session, name, version)
    context.bundles.require_trusted(bundle)
    selector = parse_selector(body.select)
    plan = plan_from_dict(body.plan)
    now = context.clock()
    rollout = start_rollout(
        session, bundle=bundle, selector=selector, plan=plan, actor=operator, now=now
    )
    session.flush()
    return status_of(session, context, rollout.id, now)


@router.get(
    "",
    response_model=list[RolloutSummary],
    summary="Rollouts, newest first",
    responses=errors(),
)
def get_rollouts(
    session: SessionDep,
    _viewer: ViewerDep,
    # Checked by `list_rollouts`, which names the states (a pattern would answer with itself).
    state: Annotated[
        str | None, Query(max_length=32, description="only this state: " + ", ".join(STATES))
    ] = None,
) -> list[RolloutSummary]:
    rollouts = list_rollouts(session, state=state)
    bundles = bundle_labels(session, (r.bundle_id for r in rollouts))
    return [RolloutSummary.model_validate(r, context=bundles) for r in rollouts]


@router.get(
    "/{rollout_id}",
    response_model=RolloutStatus,
    summary="A rollout's state, current stage and gate verdict, and transitions",
    responses=errors(404),
)
def get_rollout_status(
    rollout_id: RolloutId, context: ContextDep, session: SessionDep, _viewer: ViewerDep
) -> RolloutStatus:
    return status_of(session, context, rollout_id)


def status_of(
    session: Session, context: ServerContext, rollout_id: int, now: dt.datetime | None = None
) -> RolloutStatus:
    """`rollout_status` as this server judges stages: its telemetry bucket, and the stage
    readings it shares with its driver (`context.stage_telemetry`)."""
    return rollout_status(
        session,
        rollout_id,
        now or context.clock(),
        bucket=context.settings.telemetry_bucket,
        telemetry=context.stage_telemetry,
    )


_MOVES = {"pause": pause_rollout, "resume": resume_rollout, "abort": abort_rollout}


def _act(
    session: Session,
    context: ServerContext,
    rollout_id: int,
    actor: Principal,
    action: str,
    body: RolloutAction | None,
) -> RolloutStatus:
    now = context.clock()
    reason = body.reason if body is not None and body.reason else None
    _MOVES[action](session, rollout_id, actor, reason, now)
    session.flush()
    return status_of(session, context, rollout_id, now)


@router.post(
    "/{rollout_id}/pause",
    response_model=RolloutStatus,
    summary="Pause a running rollout: no new devices are notified until resumed",
    responses=errors(404, 409),
)
def pause(
    rollout_id: RolloutId,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
    body: ActionBody = None,
) -> RolloutStatus:
    return _act(session, context, rollout_id, operator, "pause", body)


@router.post(
    "/{rollout_id}/resume",
    response_model=RolloutStatus,
    summary="Resume a paused rollout",
    responses=errors(404, 409),
)
def resume(
    rollout_id: RolloutId,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
    body: ActionBody = None,
) -> RolloutStatus:
    return _act(session, context, rollout_id, operator, "resume", body)


@router.post(
    "/{rollout_id}/abort",
    response_model=RolloutStatus,
    summary="Abort a rollout: devices that installed it roll back",
    responses=errors(404, 409),
)
def abort(
    rollout_id: RolloutId,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
    body: ActionBody = None,
) -> RolloutStatus:
    return _act(session, context, rollout_id, operator, "abort", body)
