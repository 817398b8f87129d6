"""Rollout operations for the API and the CLI: start, pause, resume, abort, read.

Every function works inside the caller's unit of work (`Database.session()`)
and records an audit entry there, so an operation and its audit line commit
together. State changes go through `machine.apply_event` (a conditional
UPDATE plus a transition row); the driver (driver.py) does the rest: it
notifies devices, advances stages and rolls back.

Starting a rollout stores the selector and the plan (defaults filled in),
computes the selection (enrolled devices whose tags match and whose profile
the bundle supports) in the rollout's own order, checks that the plan's
stages can be cut from it, and records the first stage's devices as pending.
Later stages are cut when they begin, from the selection as it is then, so
devices enrolled meanwhile take part.

A start is refused when the bundle's release counter is below the security
floor that any selected device reported for the bundle's model name: such a
device would refuse the install (`below-security-floor`), and only a release
at or above the floor reaches it. Devices that never reported floors (agents
that predate them) are not held back.

A device takes part in one active (running, paused, aborting) rollout at a
time. A start whose selection overlaps another active rollout is refused; a
later stage (and the driver's late joiners) records such a device as
`skipped`, with the other rollout named in its reason, and the driver lets it
join once that rollout ended. Every path that adds devices first takes the
membership lock (membership.py).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.api.schemas.rollouts import RolloutStatus, StageStatus, TransitionPublic
from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import BundleRow, Device, Rollout, RolloutDevice, RolloutTransition
from edgefleet.server.errors import ConflictError, InvalidRequestError, NotFoundError
from edgefleet.server.principals import Principal
from edgefleet.server.rollouts.gates import evaluate_stage
from edgefleet.server.rollouts.machine import (
    ACTIVE_STATES,
    RolloutEvent,
    RolloutState,
    apply_event,
)
from edgefleet.server.rollouts.membership import busy_devices, lock_membership, skipped_reason
from edgefleet.server.rollouts.plan import Plan, plan_from_dict, plan_to_dict, stage_targets
from edgefleet.server.rollouts.progress import (
    DeviceState,
    stage_counts,
    state_counts,
    unchecked_counts,
)
from edgefleet.server.rollouts.selection import matches, order_selection
from edgefleet.server.rollouts.stagetelemetry import StageTelemetryCache
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)

_SHOWN_DEVICES = 5  # devices named in a conflict message


def select_devices(session: Session, bundle: BundleRow, selector: Mapping[str, str]) -> list[str]:
    """Ids of enrolled devices whose tags match `selector` and whose profile `bundle` supports."""
    profiles = [str(p) for p in bundle.profiles]
    rows = session.execute(
        select(Device.id, Device.tags).where(Device.profile.in_(profiles)).order_by(Device.id)
    ).all()
    return [device_id for device_id, tags in rows if matches(tags or {}, selector)]


def add_stage_devices(
    session: Session,
    rollout: Rollout,
    plan: Plan,
    stage_index: int,
    selection: Sequence[str],
    now: dt.datetime,
) -> list[str]:
    """Record the devices stage `stage_index` adds (pending); returns their ids.

    The stage's cumulative size is cut from the ordered `selection`; devices
    already in the rollout (earlier stages, late joiners, skipped) count
    towards it. A device that takes part in another active rollout is
    recorded `skipped` instead (not returned): its place is not given to
    another device, and it joins when the other rollout ends.

    Raises:
        InvalidRequestError: a named device is not in the selection.
        StorageError: see `lock_membership`.
    """
    targets = stage_targets(plan, selection)[stage_index]
    lock_membership(session)
    busy = busy_devices(session, rollout.id)
    assigned = set(
        session.scalars(
            select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        )
    )
    present = set(selection)
    new = [d for d in targets if d not in assigned]
    missing = len(targets) - len(new) - len(assigned & present)
    if missing > 0:  # late joiners took places of devices that have since left
        chosen = set(new)
        extra = [d for d in selection if d not in assigned and d not in chosen]
        new += extra[:missing]
    shadow = plan.stages[stage_index].shadow
    for device_id in new:
        other = busy.get(device_id)
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device_id,
                stage_index=stage_index,
                shadow=shadow,
                state=DeviceState.PENDING if other is None else DeviceState.SKIPPED,
                attempts=0,
                updated_at=now,
                reason=None if other is None else skipped_reason(other),
            )
        )
    skipped = [d for d in new if d in busy]
    if skipped:
        log.info(
            "rollout %d: %s: %d device(s) skipped, in other active rollouts (%s)",
            rollout.id,
            plan.stage_name(stage_index),
            len(skipped),
            ", ".join(skipped[:_SHOWN_DEVICES]),
        )
    return [d for d in new if d not in busy]


def start_rollout(
    session: Session,
    *,
    bundle: BundleRow,
    selector: dict[str, str],
    plan: Plan,
    actor: Principal,
    now: dt.datetime | None = None,
) -> Rollout:
    """Create a running rollout of `bundle` to the devices `selector` picks.

    Raises:
        InvalidRequestError: no device is selected, or the plan names a device
            outside the selection.
        ConflictError: a rollout of the same bundle name is active, a selected
            device takes part in another active rollout, or a selected device's
            security floor for the bundle's name is above its release counter.
        StorageError: see `lock_membership`.
    """
    now = now or utcnow()
    lock_membership(session)  # before reading which devices are free
    selection = select_devices(session, bundle, selector)
    if not selection:
        shown = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(all devices)"
        raise InvalidRequestError(
            f"no enrolled device matches {shown} with a profile the bundle supports "
            f"({', '.join(map(str, bundle.profiles))})"
        )
    _refuse_below_floor(session, bundle, selection)
    _refuse_overlap(session, bundle, selection)
    rollout = Rollout(
        bundle_id=bundle.id,
        selector=dict(selector),
        plan=plan_to_dict(plan),
        state=RolloutState.CREATED,
        stage_index=0,
        stage_started_at=None,
        reason=None,
        created_by=actor.name,
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()  # the id seeds the order of the selection
    ordered = order_selection(rollout.id, selection)
    stage_targets(plan, ordered)  # raises InvalidRequestError before anything is recorded
    apply_event(session, rollout, RolloutEvent.START, actor=actor.name, reason="started", now=now)
    first = add_stage_devices(session, rollout, plan, 0, ordered, now)
    record_audit(
        session,
        actor,
        "rollout.start",
        f"rollout {rollout.id}",
        {
            "bundle": f"{bundle.name}@{bundle.version}",
            "selector": dict(selector),
            "selected": len(selection),
            "first_stage": len(first),
        },
        now=now,
    )
    return rollout


def _refuse_below_floor(session: Session, bundle: BundleRow, selection: Sequence[str]) -> None:
    chosen = set(selection)
    rows = session.execute(
        select(Device.id, Device.security_floors)
        .where(Device.profile.in_([str(p) for p in bundle.profiles]))
        .order_by(Device.id)
    ).all()
    above = [
        (device_id, int(floors[bundle.name]))
        for device_id, floors in rows
        if device_id in chosen
        and isinstance(floors, dict)
        and int(floors.get(bundle.name, 0)) > bundle.release_counter
    ]
    if above:
        device_id, floor = above[0]
        raise ConflictError(
            f"{len(above)} selected device(s) have a security floor for {bundle.name} above "
            f"{bundle.name}@{bundle.version} (release counter {bundle.release_counter}), e.g. "
            f"{device_id} at {floor}: they would refuse it; roll out a release at or above "
            "their floor, or narrow the selector"
        )


def _refuse_overlap(session: Session, bundle: BundleRow, selection: Sequence[str]) -> None:
    same = session.execute(
        select(Rollout.id, BundleRow.version)
        .join(BundleRow, BundleRow.id == Rollout.bundle_id)
        .where(BundleRow.name == bundle.name, Rollout.state.in_(ACTIVE_STATES))
        .order_by(Rollout.id)
    ).first()
    if same is not None:
        raise ConflictError(
            f"rollout {same[0]} of {bundle.name}@{same[1]} is still active; let it complete "
            f"or abort it before starting another rollout of the model {bundle.name} "
            f"(here {bundle.name}@{bundle.version})"
        )
    busy: dict[int, list[str]] = {}
    taken = busy_devices(session)
    for device_id in selection:
        if device_id in taken:
            busy.setdefault(taken[device_id], []).append(device_id)
    if busy:
        rollout_id, devices = min(busy.items())
        shown = ", ".join(sorted(devices)[:_SHOWN_DEVICES])
        raise ConflictError(
            f"{len(devices)} selected device(s) ({shown}) take part in active rollout "
            f"{rollout_id}; narrow the selector or wait for it to finish"
        )


def get_rollout(session: Session, rollout_id: int) -> Rollout:
    """Raises: NotFoundError when there is no such rollout."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    return rollout


def list_rollouts(session: Session, state: str | None = None) -> list[Rollout]:
    """Rollouts, newest first; only those in `state` when given.

    Raises:
        InvalidRequestError: `state` is not a rollout state.
    """
    query = select(Rollout).order_by(Rollout.id.desc())
    if state is not None:
        try:
            wanted = RolloutState(state)
        except ValueError:
            known = ", ".join(s.value for s in RolloutState if s is not RolloutState.CREATED)
            raise InvalidRequestError(f"state {state!r} is not one of {known}") from None
        query = query.where(Rollout.state == wanted)
    return list(session.scalars(query))


def _operate(
    session: Session,
    rollout_id: int,
    event: RolloutEvent,
    actor: Principal,
    reason: str | None,
    now: dt.datetime | None,
) -> Rollout:
    now = now or utcnow()
    rollout = get_rollout(session, rollout_id)
    why = reason or f"{event.value} by {actor.name}"
    apply_event(session, rollout, event, actor=actor.name, reason=why, now=now)
    record_audit(
        session, actor, f"rollout.{event.value}", f"rollout {rollout_id}", {"reason": why}, now=now
    )
    return rollout


def pause_rollout(
    session: Session,
    rollout_id: int,
    actor: Principal,
    reason: str | None = None,
    now: dt.datetime | None = None,
) -> Rollout:
    """Stop notifying devices; those already notified carry on.

    Raises:
        NotFoundError: no such rollout.
        RolloutStateError: the rollout is not running (or changed concurrently).
    """
    return _operate(session, rollout_id, RolloutEvent.PAUSE, actor, reason, now)


def resume_rollout(
    session: Session,
    rollout_id: int,
    actor: Principal,
    reason: str | None = None,
    now: dt.datetime | None = None,
) -> Rollout:
    """Continue a paused rollout where it stopped.

    Raises:
        NotFoundError: no such rollout.
        RolloutStateError: the rollout is not paused (or changed concurrently).
    """
    return _operate(session, rollout_id, RolloutEvent.RESUME, actor, reason, now)


def abort_rollout(
    session: Session,
    rollout_id: int,
    actor: Principal,
    reason: str | None = None,
    now: dt.datetime | None = None,
) -> Rollout:
    """Abort: the driver sends rollback directives to the devices that took the bundle.

    Raises:
        NotFoundError: no such rollout.
        RolloutStateError: the rollout is not running or paused (or changed concurrently).
    """
    return _operate(session, rollout_id, RolloutEvent.ABORT, actor, reason, now)


# --- reading ------------------------------------------------------------------------------


def rollout_status(
    session: Session,
    rollout_id: int,
    now: dt.datetime | None = None,
    *,
    bucket: dt.timedelta = dt.timedelta(minutes=5),
    telemetry: StageTelemetryCache | None = None,
) -> RolloutStatus:
    """The rollout, its stages with device counts, the current stage's verdict, its history.

    The verdict reads the stage's telemetry through `telemetry` where given (a large
    reading kept a few seconds: `stagetelemetry`), else afresh.

    Raises:
        NotFoundError: no such rollout.
        InvalidRequestError: the stored plan no longer validates (a bug, not an input).
    """
    now = now or utcnow()
    rollout = get_rollout(session, rollout_id)
    bundle = session.get(BundleRow, rollout.bundle_id)
    if bundle is None:  # the foreign key forbids it
        raise NotFoundError(f"the bundle of rollout {rollout_id} is gone")
    plan = plan_from_dict(rollout.plan)
    unchecked = unchecked_counts(session, rollout.id)
    stages: list[StageStatus] = []
    for index, stage in enumerate(plan.stages):
        states = state_counts(session, rollout.id, index)
        verdict: dict[str, Any] = {}
        current = index == rollout.stage_index
        if current and rollout.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            counts = stage_counts(
                session,
                rollout,
                bundle,
                index,
                shadow=stage.shadow,
                now=now,
                bucket=bucket,
                telemetry=telemetry,
            )
            result = evaluate_stage(plan.stage_gates(index), counts, shadow=stage.shadow)
            verdict = result.to_dict()
            if counts.telemetry_read_at is not None:
                age = (now - counts.telemetry_read_at).total_seconds()
                verdict["telemetry_age_s"] = round(max(0.0, age), 1)
        stages.append(
            StageStatus(
                index=index,
                name=plan.stage_name(index),
                shadow=stage.shadow,
                assigned=sum(n for k, n in states.items() if k != DeviceState.SKIPPED),
                states=states,
                unchecked=unchecked.get(index, 0),
                **verdict,
            )
        )
    transitions = session.scalars(
        select(RolloutTransition)
        .where(RolloutTransition.rollout_id == rollout.id)
        .order_by(RolloutTransition.id)
    )
    return RolloutStatus(
        id=rollout.id,
        bundle=f"{bundle.name}@{bundle.version}",
        state=rollout.state,
        stage_index=rollout.stage_index,
        stage_count=len(plan.stages),
        stage_started_at=rollout.stage_started_at,
        selector={str(k): str(v) for k, v in rollout.selector.items()},
        devices=state_counts(session, rollout.id),
        stages=stages,
        transitions=[TransitionPublic.model_validate(t) for t in transitions],
        created_by=rollout.created_by,
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        reason=rollout.reason,
    )


__all__ = [
    "abort_rollout",
    "add_stage_devices",
    "get_rollout",
    "list_rollouts",
    "pause_rollout",
    "resume_rollout",
    "rollout_status",
    "select_devices",
    "start_rollout",
]
