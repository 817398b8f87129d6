"""The rollout driver: moves every active rollout forward, one unit of work per rollout.

At each tick, for each rollout in an active state (running, paused or
aborting: `machine.ACTIVE_STATES`), the driver takes the lease `rollout:{id}`
(another replica holding it drives that rollout; this one skips it), and in
the same unit of work reconciles its device states from the stored status
reports (progress.py), then works on it by state:

- running: retries, timeouts, late joiners, notifications within the rate
  limit, and the stage's gates (running.py, joining.py, notify.py), judged on
  telemetry that a large stage reads at most a tenth of the time
  (stagetelemetry.py: pass the API's `stage_telemetry` to share its readings);
- paused: nothing more (devices already notified carry on);
- aborting: rollback directives, and `aborted` once none is left rolling
  back (aborting.py).

What a phase needs of the tick (the session, the rollout, the directives it
signed) is a `step.RolloutStep`. Directives are prepared (sequence allocated,
signed) inside the unit of work and published only after it commits; at most
`MAX_DIRECTIVES_PER_TICK` per rollout and tick, so the unit of work stays
well under the lease TTL. A directive the broker did not take is undone in a
second unit of work and sent next tick (publication.py). If the process dies
between commit and publication, the devices stay notified without a
directive; the timeout and retry path sends them another one.

Before the rollouts, each tick sends unanswered directives again (resend.py):
to the devices ingestion saw come back (`returns`), and to every online device
once the broker link connected again (`connects`, the link's connection count).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Rollout, RolloutState
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.errors import ServerError
from edgefleet.server.leases import acquire_lease, release_lease
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.rollouts.aborting import drive_aborting
from edgefleet.server.rollouts.machine import ACTIVE_STATES
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.progress import reconcile
from edgefleet.server.rollouts.publication import publish_directives
from edgefleet.server.rollouts.resend import Returns, send_again, unanswered
from edgefleet.server.rollouts.running import drive_running
from edgefleet.server.rollouts.stagetelemetry import StageTelemetryCache
from edgefleet.server.rollouts.step import RolloutStep
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)

# Directives signed per rollout and tick: keeps a unit of work (and the lease row lock it
# holds on PostgreSQL) well under the lease TTL; the rest go out at the next ticks.
MAX_DIRECTIVES_PER_TICK = 500


def lease_name(rollout_id: int) -> str:
    return f"rollout:{rollout_id}"


@dataclass
class TickReport:
    """What one tick did (for logs, metrics and tests)."""

    driven: list[int] = field(default_factory=list)  # rollouts this replica held
    skipped: list[int] = field(default_factory=list)  # held by another replica
    published: int = 0
    resent: int = 0  # unanswered directives sent again
    events: list[tuple[int, str]] = field(default_factory=list)  # (rollout id, event)
    # A rollout used all of this tick's directives: more are waiting, tick again at once.
    saturated: bool = False


class RolloutDriver:
    """Drives rollouts; several replicas may run one each on a shared database."""

    def __init__(
        self,
        db: Database,
        issuer: DirectiveIssuer,
        publisher: Publisher,
        settings: ServerSettings,
        clock: Callable[[], dt.datetime] = utcnow,
        *,
        returns: Returns | None = None,
        connects: Callable[[], int] | None = None,
        stage_telemetry: StageTelemetryCache | None = None,
    ) -> None:
        self.db = db
        self.issuer = issuer
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.returns = returns
        self.connects = connects
        self._connects_seen = 0
        self.stage_telemetry = stage_telemetry or StageTelemetryCache()

    def tick(self) -> TickReport:
        """Drive every active rollout once (each in its own unit of work).

        A rollout whose unit of work fails is logged and retried next tick;
        the others still run.

        Raises:
            StorageError: the list of active rollouts could not be read.
        """
        report = TickReport()
        report.resent = self._send_again()
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES)).order_by(Rollout.id)
                )
            )
        for rollout_id in ids:
            try:
                self._drive(rollout_id, report)
            except ServerError as exc:
                log.warning("rollout %d: tick failed: %s", rollout_id, exc)
            except Exception:  # a bug in one rollout must not stop the others
                log.exception("rollout %d: tick failed", rollout_id)
        return report

    def _send_again(self) -> int:
        """Send unanswered directives again: to every online device after the broker link
        connected again, else to the devices that came back. Returns how many went out."""
        returned = self.returns.take() if self.returns is not None else set()
        connects = self.connects() if self.connects is not None else self._connects_seen
        reconnected = connects != self._connects_seen
        if not returned and not reconnected:
            return 0
        try:
            directives = unanswered(
                self.db, self.issuer, self.clock(), None if reconnected else returned
            )
        except ServerError as exc:
            log.warning("unanswered directives not sent again: %s", exc)
            return 0
        self._connects_seen = connects
        return send_again(self.publisher, directives)

    def _drive(self, rollout_id: int, report: TickReport) -> None:
        now = self.clock()
        with self.db.session() as session:
            held = acquire_lease(
                session,
                lease_name(rollout_id),
                self.settings.replica_id,
                self.settings.lease_ttl,
                now=now,
            )
            if not held:
                report.skipped.append(rollout_id)
                return
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.state not in ACTIVE_STATES:
                return
            report.driven.append(rollout_id)
            bundle = session.get(BundleRow, rollout.bundle_id)
            assert bundle is not None  # a foreign key
            step = RolloutStep(
                session=session,
                rollout=rollout,
                bundle=bundle,
                plan=plan_from_dict(rollout.plan),
                now=now,
                issuer=self.issuer,
                settings=self.settings,
                room=MAX_DIRECTIVES_PER_TICK,
                telemetry=self.stage_telemetry,
            )
            reconcile(session, rollout, now)
            if rollout.state is RolloutState.RUNNING:
                drive_running(step)
            elif rollout.state is RolloutState.ABORTING:
                drive_aborting(step)
            report.events += [(rollout_id, event.value) for event in step.events]
            report.saturated |= step.room <= 0
            if rollout.state not in ACTIVE_STATES:  # completed or aborted: nothing left to drive
                release_lease(session, lease_name(rollout_id), self.settings.replica_id)
        report.published += publish_directives(
            self.db, self.publisher, rollout_id, step.outgoing, step.counted
        )


__all__ = ["MAX_DIRECTIVES_PER_TICK", "RolloutDriver", "TickReport", "lease_name"]
