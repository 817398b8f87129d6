"""The fleet overview at `/`: presence, versions in service, health, open alerts, rollouts."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.server.api.deps import ContextDep
from edgefleet.server.db.models import Alert, BundleRow, Device, Rollout, RolloutState
from edgefleet.server.web.auth import ViewerPage
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

NEWEST_ALERTS = 5
ACTIVE_ROLLOUT_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTING)
HEALTH_ORDER = ("failing", "degraded", "unknown", "ok")


@dataclass(frozen=True)
class VersionCount:
    model_name: str | None  # None: devices with no model installed
    model_version: str | None
    devices: int


@dataclass(frozen=True)
class ActiveRollout:
    id: int
    bundle: str  # name@version
    state: str
    stage: int  # 1-based
    stages: int


@dataclass(frozen=True)
class FleetOverview:
    online: int
    offline: int
    versions: list[VersionCount]  # most devices first
    health: dict[str, int]  # online devices per health state, HEALTH_ORDER first
    open_alerts: dict[str, int]  # per kind
    newest_alerts: list[Alert]
    rollouts: list[ActiveRollout]

    @property
    def devices(self) -> int:
        return self.online + self.offline


def fleet_overview(session: Session) -> FleetOverview:
    """The overview's figures, each from one aggregate query."""
    presence = dict(
        session.execute(select(Device.online, func.count()).group_by(Device.online)).all()
    )
    versions = [
        VersionCount(name, version, count)
        for name, version, count in session.execute(
            select(Device.model_name, Device.model_version, func.count())
            .group_by(Device.model_name, Device.model_version)
            .order_by(
                func.count().desc(),
                Device.model_name.nulls_last(),
                Device.model_version.nulls_last(),
            )
        )
    ]
    found = dict(
        session.execute(
            select(Device.health, func.count())
            .where(Device.online.is_(True))
            .group_by(Device.health)
        ).all()
    )
    health = {state: found.pop(state, 0) for state in HEALTH_ORDER} | found
    open_alert = Alert.resolved_at.is_(None)
    open_alerts = dict(
        session.execute(
            select(Alert.kind, func.count())
            .where(open_alert)
            .group_by(Alert.kind)
            .order_by(Alert.kind)
        ).all()
    )
    newest = list(
        session.scalars(
            select(Alert)
            .where(open_alert)
            .order_by(Alert.opened_at.desc(), Alert.id.desc())
            .limit(NEWEST_ALERTS)
        )
    )
    rollouts = [
        ActiveRollout(
            rollout.id,
            f"{bundle.name}@{bundle.version}",
            rollout.state.value,
            rollout.stage_index + 1,
            len(rollout.plan.get("stages", [])),
        )
        for rollout, bundle in session.execute(
            select(Rollout, BundleRow)
            .join(BundleRow, BundleRow.id == Rollout.bundle_id)
            .where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
            .order_by(Rollout.id.desc())
        )
    ]
    return FleetOverview(
        online=presence.get(True, 0),
        offline=presence.get(False, 0),
        versions=versions,
        health=health,
        open_alerts=open_alerts,
        newest_alerts=newest,
        rollouts=rollouts,
    )


@router.get("/")
def overview_page(request: Request, context: ContextDep, _user: ViewerPage) -> HTMLResponse:
    with context.db.session() as session:
        overview = fleet_overview(session)
    return render(request, "overview.html", section="overview", overview=overview)


__all__ = ["FleetOverview", "fleet_overview", "router"]
