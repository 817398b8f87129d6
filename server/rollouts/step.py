"""One tick of one rollout: what every phase of the driver works with.

A `RolloutStep` lives inside one unit of work that holds the rollout's lease.
The phases (running.py, joining.py, notify.py, aborting.py) read and change
the rollout's rows through it, and queue the directives they sign in
`outgoing`, which the driver publishes once the unit of work has committed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import BundleRow, Device, DeviceState, Rollout, RolloutDevice
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective
from edgefleet.server.errors import RolloutStateError
from edgefleet.server.rollouts.machine import RolloutEvent, apply_event
from edgefleet.server.rollouts.plan import Plan
from edgefleet.server.rollouts.stagetelemetry import StageTelemetryCache
from edgefleet.server.settings import ServerSettings

log = logging.getLogger(__name__)

ACTOR = "driver"  # the actor of the transitions the driver makes
# Seen, then gone offline: what was sent to it may be queued, lost or expired (re-notified
# when back). A device never seen (no last_seen) was never notified: `notify` waits for
# its first connection.
OFFLINE = and_(Device.online.is_(False), Device.last_seen.is_not(None))


@dataclass
class RolloutStep:
    """One tick of one rollout inside one unit of work (holding its lease)."""

    session: Session
    rollout: Rollout
    bundle: BundleRow
    plan: Plan
    now: dt.datetime
    issuer: DirectiveIssuer
    settings: ServerSettings
    room: int  # directives this tick may still sign
    telemetry: StageTelemetryCache  # large stages' telemetry readings, kept a few seconds
    outgoing: list[OutgoingDirective] = field(default_factory=list)
    # Devices whose install directive counts as a new attempt (undone if not published).
    counted: set[str] = field(default_factory=set)
    events: list[RolloutEvent] = field(default_factory=list)  # events this tick applied

    def devices(
        self,
        *states: DeviceState,
        where: ColumnElement[bool] | None = None,
        limit: int | None = None,
    ) -> list[tuple[RolloutDevice, Device]]:
        """This rollout's devices in `states` (earlier stages first), filtered in SQL."""
        query = (
            select(RolloutDevice, Device)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == self.rollout.id, RolloutDevice.state.in_(states))
            .order_by(RolloutDevice.stage_index, RolloutDevice.device_id)
        )
        if where is not None:
            query = query.where(where)
        if limit is not None:
            query = query.limit(limit)
        return [(rd, device) for rd, device in self.session.execute(query).all()]

    def set_state(self, rd: RolloutDevice, state: DeviceState, reason: str | None) -> None:
        rd.state = state
        rd.reason = reason
        rd.updated_at = self.now

    def send(
        self,
        rd: RolloutDevice,
        directive: OutgoingDirective,
        state: DeviceState,
        reason: str | None,
    ) -> None:
        """Record `directive` as `rd`'s latest, move `rd` to `state`, queue the directive.

        `notified_at` is the directive's issued time: with the sequence it is all
        `DirectiveIssuer.resign` needs to rebuild the same bytes.
        """
        rd.directive_sequence = directive.sequence
        rd.notified_at = directive.issued_at
        self.set_state(rd, state, reason)
        self.outgoing.append(directive)
        self.room -= 1

    def event(self, event: RolloutEvent, reason: str) -> bool:
        """Apply `event` to the rollout; False when an operator changed it first."""
        try:
            apply_event(self.session, self.rollout, event, actor=ACTOR, reason=reason, now=self.now)
        except RolloutStateError as exc:  # the next tick reads the rollout again
            log.info("rollout %d: %s", self.rollout.id, exc)
            return False
        self.events.append(event)
        log.info("rollout %d: %s (%s)", self.rollout.id, event.value, reason)
        return True


__all__ = ["ACTOR", "OFFLINE", "RolloutStep"]
