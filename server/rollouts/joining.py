"""Running rollouts: devices that join the current stage after the rollout started.

Late joiners are devices enrolled after the start that match the rollout's
selector and the bundle's profiles; one that takes part in another active
rollout is recorded skipped. Skipped devices (left out because they took part
in another active rollout) join once that rollout ended and they still match.
Both take the membership lock first and read again under it: a start may have
taken the devices meanwhile (membership.py).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from edgefleet.server.db.models import Device, DeviceState, RolloutDevice
from edgefleet.server.rollouts.membership import lock_membership, other_rollout_of, skipped_reason
from edgefleet.server.rollouts.selection import matches, order_selection
from edgefleet.server.rollouts.step import RolloutStep

log = logging.getLogger(__name__)


def admit_late_joiners(step: RolloutStep) -> None:
    """Record late joiners in the current stage: pending, or skipped when in another rollout."""
    if not _joiners(step):
        return
    lock_membership(step.session)
    stage = step.rollout.stage_index
    skipped = 0
    for device_id, other in _joiners(step):  # again under the lock
        skipped += other is not None
        step.session.add(
            RolloutDevice(
                rollout_id=step.rollout.id,
                device_id=device_id,
                stage_index=stage,
                shadow=step.plan.stages[stage].shadow,
                state=DeviceState.PENDING if other is None else DeviceState.SKIPPED,
                attempts=0,
                updated_at=step.now,
                reason=(
                    "joined after the rollout started" if other is None else skipped_reason(other)
                ),
            )
        )
    if skipped:
        log.info(
            "rollout %d: %d late joiner(s) skipped, in other rollouts", step.rollout.id, skipped
        )
    step.session.flush()


def _joiners(step: RolloutStep) -> list[tuple[str, int | None]]:
    """Late joiners in the rollout's order, each with the other active rollout it is in."""
    rollout = step.rollout
    rows = step.session.execute(
        select(Device.id, Device.tags, other_rollout_of(Device.id, rollout.id)).where(
            Device.enrolled_at > rollout.created_at,
            Device.profile.in_([str(p) for p in step.bundle.profiles]),
            ~select(RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.device_id == Device.id)
            .exists(),
        )
    ).all()
    others = {d: other for d, tags, other in rows if matches(tags or {}, rollout.selector)}
    return [(d, others[d]) for d in order_selection(rollout.id, others)]


def admit_skipped(step: RolloutStep) -> None:
    """Skipped devices whose other rollout ended join the current stage."""
    if not _free_skipped(step):
        return
    lock_membership(step.session)
    stage = step.rollout.stage_index
    for rd in _free_skipped(step):  # again under the lock
        rd.stage_index = stage
        rd.shadow = step.plan.stages[stage].shadow
        step.set_state(rd, DeviceState.PENDING, "joined after the rollout it was in ended")


def _free_skipped(step: RolloutStep) -> list[RolloutDevice]:
    free = other_rollout_of(RolloutDevice.device_id, step.rollout.id).is_(None)
    profiles = {str(p) for p in step.bundle.profiles}
    return [
        rd
        for rd, device in step.devices(DeviceState.SKIPPED, where=free)
        # A device whose tags or profile changed meanwhile stays out.
        if device.profile in profiles and matches(device.tags or {}, step.rollout.selector)
    ]


__all__ = ["admit_late_joiners", "admit_skipped"]
