"""The rollout driver: moves every active rollout forward, one unit of work per rollout.

At each tick, for each rollout in `running`, `paused` or `aborting` state,
the driver takes the lease `rollout:{id}` (another replica holding it drives
that rollout; this one skips it), and in the same unit of work:

running:
  1. reconciles device states from stored status reports (progress.py);
  2. retries failed and timed-out devices with attempts left (back to pending);
  3. times out devices that were notified `device_timeout_s` ago, are online
     and gave no final answer;
  4. assigns late joiners (devices enrolled after the rollout started that
     match it) to the current stage, and lets skipped devices (left out
     because they took part in another active rollout) join it once that
     rollout ended; a late joiner in another active rollout is skipped too.
     Both take the membership lock first (membership.py);
  5. re-notifies devices whose directive went unanswered and expired, or that
     went offline after being notified and are back (a new directive, a new
     sequence: the old one may be lost or expired by now);
  6. notifies pending devices that are online (or never seen).
     Steps 5 and 6 share the plan's rate limit: at most
     `rate_limit_per_minute` install directives in any 60 s, counted from
     `RolloutDevice.notified_at` so the limit holds across replicas and
     restarts. The count is exact because a device gets at most one directive
     per 60 s (a retry or re-notification waits until its last directive is
     out of the window), so its one stored time is its only directive there;
  7. evaluates the current stage's gates: ADVANCE begins the next stage (its
     devices recorded pending, or skipped; after a shadow stage the shadow
     devices get a real install), the last stage COMPLETEs, FAIL pauses or
     aborts per plan;
paused: reconciles only (devices already notified carry on);
aborting: reconciles, sends rollback directives to the devices that took or
  may take the bundle (notified, installing, succeeded; or any other whose
  heartbeat says it serves the bundle) and had a version before, and to the
  shadow devices; then waits until none is rolling back (confirmed, failed or
  timed out) and moves the rollout to `aborted`.

Directives are prepared (sequence allocated, signed) inside the unit of work
and published only after it commits; at most `MAX_DIRECTIVES_PER_TICK` per
rollout and tick, so the unit of work stays well under the lease TTL. A
directive the publisher refuses is undone in a second unit of work (the device
goes back to pending, or to installing for a rollback) and sent next tick. If
the process dies between commit and publication, the devices stay notified
without a directive; the timeout and retry path sends them another one.

A rollback directive names the bundle it undoes, and the agent acts only
where that bundle runs: a device serving it goes back to its previous
version, one whose install never happened (the directive was lost, or it
failed) keeps what it serves, and a shadow device stops the shadow copy and
keeps serving. So shadow devices get the rollback too, and a lost install
directive cannot take a device a version too far back. A non-shadow device
without a recorded previous version (it served nothing, or already this
version) gets none and keeps the bundle.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, Rollout, RolloutDevice
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective, publish_all
from edgefleet.server.errors import InvalidRequestError, RolloutStateError, ServerError
from edgefleet.server.leases import acquire_lease, release_lease
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.rollouts.gates import GateDecision, evaluate_stage
from edgefleet.server.rollouts.machine import RolloutEvent, RolloutState, apply_event
from edgefleet.server.rollouts.membership import (
    lock_membership,
    other_rollout_of,
    skipped_reason,
)
from edgefleet.server.rollouts.plan import Plan, plan_from_dict
from edgefleet.server.rollouts.progress import DeviceState, reconcile, stage_counts
from edgefleet.server.rollouts.selection import matches, order_selection
from edgefleet.server.rollouts.service import add_stage_devices, select_devices
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)

ACTOR = "driver"
RATE_WINDOW = dt.timedelta(minutes=1)
# Directives signed per rollout and tick: keeps a unit of work (and the lease row lock it
# holds on PostgreSQL) well under the lease TTL; the rest go out at the next ticks.
MAX_DIRECTIVES_PER_TICK = 500
OFFLINE_MARK = "went offline before answering; notified again when back"
_DRIVEN = [RolloutState.RUNNING.value, RolloutState.PAUSED.value, RolloutState.ABORTING.value]
D = DeviceState
_MAY_HOLD_BUNDLE = frozenset({D.NOTIFIED.value, D.INSTALLING.value, D.SUCCEEDED.value})
# Known to be offline; a device never seen (no last_seen) counts as reachable.
_OFFLINE = and_(Device.online.is_(False), Device.last_seen.is_not(None))


def lease_name(rollout_id: int) -> str:
    return f"rollout:{rollout_id}"


@dataclass
class TickReport:
    """What one tick did (for logs, metrics and tests)."""

    driven: list[int] = field(default_factory=list)  # rollouts this replica held
    skipped: list[int] = field(default_factory=list)  # held by another replica
    published: int = 0
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
    ) -> None:
        self.db = db
        self.issuer = issuer
        self.publisher = publisher
        self.settings = settings
        self.clock = clock

    def tick(self) -> TickReport:
        """Drive every active rollout once (each in its own unit of work).

        A rollout whose unit of work fails is logged and retried next tick;
        the others still run.

        Raises:
            StorageError: the list of active rollouts could not be read.
        """
        report = TickReport()
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(Rollout.id).where(Rollout.state.in_(_DRIVEN)).order_by(Rollout.id)
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

    def run(self, stop: threading.Event) -> None:
        """Tick every `settings.driver_interval_s` until `stop` is set; never raises.

        A tick that used all its directives (a large stage) is followed by the next
        one at once, so notifying a big fleet is not paced by the interval.
        """
        while not stop.is_set():
            saturated = False
            try:
                report = self.tick()
                # Not when nothing got out (a broker down): that would spin.
                saturated = report.saturated and report.published > 0
            except Exception:  # the driver must outlive a bad tick (database restarts, bugs)
                log.exception("rollout driver tick failed")
            if not saturated:
                stop.wait(self.settings.driver_interval_s)

    # --- one rollout ------------------------------------------------------------------------

    def _drive(self, rollout_id: int, report: TickReport) -> None:
        now = self.clock()
        outgoing: list[OutgoingDirective] = []
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
            if rollout is None or rollout.state not in _DRIVEN:
                return
            report.driven.append(rollout_id)
            bundle = session.get(BundleRow, rollout.bundle_id)
            assert bundle is not None  # a foreign key
            plan = plan_from_dict(rollout.plan)
            step = _RolloutStep(self, session, rollout, bundle, plan, now, outgoing, report)
            step.run()
            report.saturated |= step.room <= 0
            if rollout.state not in _DRIVEN:  # completed or aborted: nothing left to drive
                release_lease(session, lease_name(rollout_id), self.settings.replica_id)
        self._publish(rollout_id, outgoing, report, step.counted)

    def _publish(
        self,
        rollout_id: int,
        outgoing: list[OutgoingDirective],
        report: TickReport,
        counted: set[str],
    ) -> None:
        """Publish committed directives; those the broker did not take are undone.

        An install not published goes back to pending (its attempt not
        counted) and a rollback back to installing, so the next tick sends
        them again instead of waiting for a timeout.
        """
        for position, directive in enumerate(outgoing):
            try:
                report.published += publish_all(self.publisher, [directive])
            except Exception as exc:  # the publisher's own errors (broker down, queue full)
                log.warning(
                    "rollout %d: %d directive(s) not published: %s",
                    rollout_id,
                    len(outgoing) - position,
                    exc,
                )
                self._unpublished(rollout_id, outgoing[position:], counted)
                return

    def _unpublished(
        self, rollout_id: int, directives: list[OutgoingDirective], counted: set[str]
    ) -> None:
        sequences = {d.device_id: d.sequence for d in directives}
        with self.db.session() as session:
            rows = session.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rollout_id,
                    RolloutDevice.device_id.in_(list(sequences)),
                )
            )
            for rd in rows:
                if rd.directive_sequence != sequences[rd.device_id]:
                    continue
                if rd.state == D.NOTIFIED.value:
                    rd.state = D.PENDING.value
                    if rd.device_id in counted:
                        rd.attempts = max(0, rd.attempts - 1)
                    rd.notified_at = None
                    rd.reason = "directive not published (broker unavailable)"
                elif rd.state == D.ROLLING_BACK.value:
                    rd.state = D.INSTALLING.value
                    rd.reason = "rollback directive not published (broker unavailable)"


class _RolloutStep:
    """One tick of one rollout inside one unit of work (holding its lease)."""

    def __init__(
        self,
        driver: RolloutDriver,
        session: Session,
        rollout: Rollout,
        bundle: BundleRow,
        plan: Plan,
        now: dt.datetime,
        outgoing: list[OutgoingDirective],
        report: TickReport,
    ) -> None:
        self.driver = driver
        self.session = session
        self.rollout = rollout
        self.bundle = bundle
        self.plan = plan
        self.now = now
        self.outgoing = outgoing
        self.report = report
        self.counted: set[str] = set()  # devices whose directive counts as a new attempt
        self.room = MAX_DIRECTIVES_PER_TICK  # directives this tick may still sign
        self.rate_left = 0  # install directives the plan's rate limit still allows

    def run(self) -> None:
        reconcile(self.session, self.rollout, self.now)
        state = RolloutState(self.rollout.state)
        if state is RolloutState.ABORTING:
            self._roll_back()
        elif state is RolloutState.RUNNING:
            self._retry()
            self._time_out()
            self._late_joiners()
            self._rejoin()
            self.rate_left = self._rate_left()
            self._renotify()
            self._notify_pending()
            self._judge()

    def _event(self, event: RolloutEvent, reason: str) -> bool:
        try:
            apply_event(self.session, self.rollout, event, actor=ACTOR, reason=reason, now=self.now)
        except RolloutStateError as exc:  # an operator got there first; next tick rereads
            log.info("rollout %d: %s", self.rollout.id, exc)
            return False
        self.report.events.append((self.rollout.id, event.value))
        log.info("rollout %d: %s (%s)", self.rollout.id, event.value, reason)
        return True

    def _devices(
        self,
        *states: DeviceState,
        where: ColumnElement[bool] | None = None,
        limit: int | None = None,
    ) -> list[tuple[RolloutDevice, Device]]:
        """This rollout's devices in `states` (earlier stages first), filtered in SQL."""
        query = (
            select(RolloutDevice, Device)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(
                RolloutDevice.rollout_id == self.rollout.id,
                RolloutDevice.state.in_([s.value for s in states]),
            )
            .order_by(RolloutDevice.stage_index, RolloutDevice.device_id)
        )
        if where is not None:
            query = query.where(where)
        if limit is not None:
            query = query.limit(limit)
        return [(rd, device) for rd, device in self.session.execute(query).all()]

    def _set(self, rd: RolloutDevice, state: DeviceState, reason: str | None) -> None:
        rd.state = state.value
        rd.reason = reason
        rd.updated_at = self.now

    # --- running ----------------------------------------------------------------------------

    def _retry(self) -> None:
        attempts_left = RolloutDevice.attempts <= self.plan.max_retries
        for rd, _ in self._devices(D.FAILED, D.TIMED_OUT, where=attempts_left):
            why = f"retry {rd.attempts} of {self.plan.max_retries} after: {rd.reason}"
            self._set(rd, D.PENDING, why)

    def _time_out(self) -> None:
        """Online devices with no final answer `device_timeout_s` after their directive."""
        since = self.now - dt.timedelta(seconds=self.plan.device_timeout_s)
        late = and_(Device.online.is_(True), RolloutDevice.notified_at <= since)
        for rd, _ in self._devices(D.NOTIFIED, D.INSTALLING, where=late):
            why = f"no final answer {self.plan.device_timeout_s} s after the directive"
            self._set(rd, D.TIMED_OUT, why)
            if rd.attempts <= self.plan.max_retries:
                self._set(rd, D.PENDING, f"retry after: {why}")

    def _late_joiners(self) -> None:
        """Devices enrolled after the start that match join the current stage.

        One that takes part in another active rollout is recorded skipped
        (`_rejoin` lets it in later).
        """
        if not self._joiners():
            return
        lock_membership(self.session)
        stage = self.rollout.stage_index
        skipped = 0
        for device_id, other in self._joiners():  # again under the lock: a start may have won
            skipped += other is not None
            self.session.add(
                RolloutDevice(
                    rollout_id=self.rollout.id,
                    device_id=device_id,
                    stage_index=stage,
                    shadow=self.plan.stages[stage].shadow,
                    state=(D.PENDING if other is None else D.SKIPPED).value,
                    attempts=0,
                    updated_at=self.now,
                    reason=(
                        "joined after the rollout started"
                        if other is None
                        else skipped_reason(other)
                    ),
                )
            )
        if skipped:
            log.info(
                "rollout %d: %d late joiner(s) skipped, in other rollouts", self.rollout.id, skipped
            )
        self.session.flush()

    def _joiners(self) -> list[tuple[str, int | None]]:
        """Late joiners in the rollout's order, each with the other active rollout it is in."""
        rows = self.session.execute(
            select(Device.id, Device.tags, other_rollout_of(Device.id, self.rollout.id)).where(
                Device.enrolled_at > self.rollout.created_at,
                Device.profile.in_([str(p) for p in self.bundle.profiles]),
                ~select(RolloutDevice.device_id)
                .where(
                    RolloutDevice.rollout_id == self.rollout.id,
                    RolloutDevice.device_id == Device.id,
                )
                .exists(),
            )
        ).all()
        others = {d: other for d, tags, other in rows if matches(tags or {}, self.rollout.selector)}
        return [(d, others[d]) for d in order_selection(self.rollout.id, others)]

    def _rejoin(self) -> None:
        """Skipped devices whose other rollout ended join the current stage."""
        if not self._free_skipped():
            return
        lock_membership(self.session)
        stage = self.rollout.stage_index
        for rd, _ in self._free_skipped():  # again under the lock: a start may have won
            rd.stage_index = stage
            rd.shadow = self.plan.stages[stage].shadow
            self._set(rd, D.PENDING, "joined after the rollout it was in ended")

    def _free_skipped(self) -> list[tuple[RolloutDevice, Device]]:
        free = other_rollout_of(RolloutDevice.device_id, self.rollout.id).is_(None)
        profiles = {str(p) for p in self.bundle.profiles}
        return [
            (rd, device)
            for rd, device in self._devices(D.SKIPPED, where=free)
            # A device whose tags or profile changed meanwhile stays out.
            if device.profile in profiles and matches(device.tags or {}, self.rollout.selector)
        ]

    def _rate_left(self) -> int:
        """Install directives the plan's rate limit allows now.

        Counted from `notified_at`: exact because a device gets at most one
        directive per `RATE_WINDOW` (`_spaced`), so the one stored time is
        its only directive in the window.
        """
        recent = self.session.scalar(
            select(func.count()).where(
                RolloutDevice.rollout_id == self.rollout.id,
                RolloutDevice.notified_at > self.now - RATE_WINDOW,
            )
        )
        return max(0, self.plan.rate_limit_per_minute - int(recent or 0))

    def _spaced(self) -> ColumnElement[bool]:
        """Devices whose last directive (if any) is older than `RATE_WINDOW`."""
        return or_(
            RolloutDevice.notified_at.is_(None),
            RolloutDevice.notified_at <= self.now - RATE_WINDOW,
        )

    def _renotify(self) -> None:
        """A new directive for notified devices back from offline, or whose directive expired.

        A device seen going offline before it answered is marked (in its
        reason, so another replica knows too); the broker may or may not have
        kept its directive, and it may have expired meanwhile. Re-notifying
        takes from the same rate limit as first notifications.
        """
        unmarked = or_(RolloutDevice.reason.is_(None), RolloutDevice.reason != OFFLINE_MARK)
        for rd, _ in self._devices(D.NOTIFIED, where=and_(_OFFLINE, unmarked)):
            rd.reason = OFFLINE_MARK
        budget = min(self.rate_left, self.room)
        if budget <= 0:
            return
        expired = RolloutDevice.notified_at <= self.now - self.driver.settings.directive_ttl
        due = and_(~_OFFLINE, self._spaced(), or_(RolloutDevice.reason == OFFLINE_MARK, expired))
        for rd, device in self._devices(D.NOTIFIED, where=due, limit=budget):
            self._install(rd, device, count_attempt=False)

    def _notify_pending(self) -> None:
        budget = min(self.rate_left, self.room)
        if budget <= 0:
            return
        # Offline devices wait: they are notified when they are back. A retry waits until
        # its last directive is out of the rate window.
        where = and_(~_OFFLINE, self._spaced())
        for rd, device in self._devices(D.PENDING, where=where, limit=budget):
            self._install(rd, device, count_attempt=True)

    def _install(self, rd: RolloutDevice, device: Device, *, count_attempt: bool) -> None:
        directive = self.driver.issuer.prepare_install(
            self.session, device, self.bundle, shadow=rd.shadow
        )
        if rd.previous_version is None and not rd.shadow:
            # What a rollback returns to: what the device served before this rollout. None
            # when it served nothing or already this version (a rollback would then take it
            # further back than this rollout moved it).
            current = (device.model_name, device.model_version)
            if device.model_version is not None and current != (
                self.bundle.name,
                self.bundle.version,
            ):
                rd.previous_version = device.model_version
        if count_attempt:
            rd.attempts += 1
            self.counted.add(rd.device_id)
        self.room -= 1
        self.rate_left -= 1
        rd.directive_sequence = directive.sequence
        rd.notified_at = self.now
        self._set(rd, D.NOTIFIED, None)
        self.outgoing.append(directive)

    def _judge(self) -> None:
        index = self.rollout.stage_index
        stage = self.plan.stages[index]
        counts = stage_counts(
            self.session,
            self.rollout,
            self.bundle,
            index,
            shadow=stage.shadow,
            now=self.now,
            bucket=self.driver.settings.telemetry_bucket,
        )
        verdict = evaluate_stage(self.plan.stage_gates(index), counts, shadow=stage.shadow)
        name = self.plan.stage_name(index)
        if verdict.decision is GateDecision.FAIL:
            self._event(RolloutEvent.GATE_FAILED, f"{name}: " + "; ".join(verdict.reasons))
        elif verdict.decision is GateDecision.ADVANCE:
            if index + 1 >= len(self.plan.stages):
                self._event(RolloutEvent.COMPLETE, f"{name} passed its gates")
            elif self._event(RolloutEvent.ADVANCE, f"{name} passed its gates"):
                self._begin_stage(index + 1, after_shadow=stage.shadow)

    def _begin_stage(self, index: int, *, after_shadow: bool) -> None:
        selection = order_selection(
            self.rollout.id, select_devices(self.session, self.bundle, self.rollout.selector)
        )
        try:
            add_stage_devices(self.session, self.rollout, self.plan, index, selection, self.now)
        except InvalidRequestError as exc:  # a named device left the selection
            self._event(RolloutEvent.PAUSE, f"cannot begin {self.plan.stage_name(index)}: {exc}")
            return
        if after_shadow and not self.plan.stages[index].shadow:
            for rd, _ in self._devices(
                D.SUCCEEDED, D.FAILED, D.TIMED_OUT, D.NOTIFIED, D.INSTALLING, D.PENDING
            ):
                if rd.shadow:
                    rd.shadow = False
                    rd.stage_index = index
                    rd.attempts = 0
                    rd.directive_sequence = None
                    self._set(rd, D.PENDING, "ran in shadow; now installs for real")

    # --- aborting ---------------------------------------------------------------------------

    def _roll_back(self) -> None:
        serving = (self.bundle.name, self.bundle.version)
        candidates = [
            (rd, device)
            for rd, device in self._devices(
                D.NOTIFIED, D.INSTALLING, D.SUCCEEDED, D.PENDING, D.FAILED, D.TIMED_OUT
            )
            # A device given up on (timed out, waiting for a retry) may still have
            # finished the install late: its heartbeat says what it serves.
            if rd.state in _MAY_HOLD_BUNDLE or (device.model_name, device.model_version) == serving
        ]
        for rd, device in candidates:
            # Shadow devices get the rollback too: it names the bundle, so they keep what
            # they serve and stop the shadow copy.
            if rd.previous_version is None and not rd.shadow:
                if rd.reason != "no previous version to roll back to":
                    rd.reason = "no previous version to roll back to"
                continue
            if self.room <= 0:
                break
            directive = self.driver.issuer.prepare_rollback(self.session, device, self.bundle)
            rd.directive_sequence = directive.sequence
            rd.notified_at = self.now
            why = (
                "stopping the shadow copy"
                if rd.shadow
                else f"rolling back to {rd.previous_version}"
            )
            self._set(rd, D.ROLLING_BACK, why)
            self.outgoing.append(directive)
            self.room -= 1
        limit = dt.timedelta(seconds=self.plan.device_timeout_s)
        for rd, _ in self._devices(D.ROLLING_BACK):
            if rd.notified_at is not None and self.now - rd.notified_at >= limit:
                # The directive stays queued for an offline device; the rollout stops waiting.
                why = f"rollback not confirmed within {self.plan.device_timeout_s} s"
                self._set(rd, D.FAILED, why)
        left = self.session.scalar(
            select(func.count()).where(
                RolloutDevice.rollout_id == self.rollout.id,
                RolloutDevice.state == D.ROLLING_BACK.value,
            )
        )
        if not left and self.room > 0:  # room left: every rollback was sent
            self._event(RolloutEvent.ROLLED_BACK, "every device that took the bundle is back")


__all__ = ["ACTOR", "RolloutDriver", "TickReport", "lease_name"]
