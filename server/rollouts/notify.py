"""Running rollouts: install directives, within the plan's rate limit.

Devices whose directive went unanswered and expired, or that went offline
after being notified and are back, are notified again first (a new directive,
a new sequence: the old one may be lost or expired by now); then pending
devices that are online. An offline device is notified when it is back, and a
device enrolled but never connected when it first connects: until then it has
no session on the broker, so a QoS 1 directive would go nowhere (the gates
count both as offline). Both take from the plan's rate
limit: at most `rate_limit_per_minute` install directives in any
`RATE_WINDOW`, counted from `RolloutDevice.notified_at` so the limit holds
across replicas and restarts. The count is exact because a device gets at
most one directive per window (a retry or re-notification waits until its
last directive is out of it), so its one stored time is its only directive
there.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, and_, func, or_, select

from edgefleet.server.db.models import Device, DeviceState, RolloutDevice
from edgefleet.server.rollouts.step import OFFLINE, RolloutStep

RATE_WINDOW = dt.timedelta(minutes=1)
OFFLINE_MARK = "went offline before answering; notified again when back"


def notify(step: RolloutStep) -> None:
    """Re-notify, then notify pending devices, as far as the rate limit and the tick allow.

    A directive's sequence locks its device's row (PostgreSQL) until commit;
    they are taken in device id order, the order ingestion locks devices in,
    so the two never wait for each other in a circle (a deadlock).
    """
    _mark_offline(step)
    budget = min(_rate_left(step), step.room)
    again = _due_again(step, budget)
    pending = _pending(step, budget - len(again))
    chosen = [(rd, device, False) for rd, device in again]
    chosen += [(rd, device, True) for rd, device in pending]
    for rd, device, first in sorted(chosen, key=lambda item: item[0].device_id):
        _install(step, rd, device, count_attempt=first)


def _rate_left(step: RolloutStep) -> int:
    """Install directives the plan's rate limit allows now."""
    recent = step.session.scalar(
        select(func.count()).where(
            RolloutDevice.rollout_id == step.rollout.id,
            RolloutDevice.notified_at > step.now - RATE_WINDOW,
        )
    )
    return max(0, step.plan.rate_limit_per_minute - int(recent or 0))


def _spaced(step: RolloutStep) -> ColumnElement[bool]:
    """Devices whose last directive (if any) is older than `RATE_WINDOW`."""
    return or_(
        RolloutDevice.notified_at.is_(None),
        RolloutDevice.notified_at <= step.now - RATE_WINDOW,
    )


def _mark_offline(step: RolloutStep) -> None:
    """Mark notified devices seen going offline before they answered.

    The mark is in the reason, so another replica knows too: the broker may
    or may not have kept the directive, and it may expire meanwhile.
    """
    unmarked = or_(RolloutDevice.reason.is_(None), RolloutDevice.reason != OFFLINE_MARK)
    for rd, _ in step.devices(DeviceState.NOTIFIED, where=and_(OFFLINE, unmarked)):
        rd.reason = OFFLINE_MARK


def _due_again(step: RolloutStep, budget: int) -> list[tuple[RolloutDevice, Device]]:
    """Notified devices back from offline, or whose directive expired: they get a new one."""
    if budget <= 0:
        return []
    expired = RolloutDevice.notified_at <= step.now - step.settings.directive_ttl
    due = and_(~OFFLINE, _spaced(step), or_(RolloutDevice.reason == OFFLINE_MARK, expired))
    return step.devices(DeviceState.NOTIFIED, where=due, limit=budget)


def _pending(step: RolloutStep, budget: int) -> list[tuple[RolloutDevice, Device]]:
    """Pending devices to notify now, earlier stages first."""
    if budget <= 0:
        return []
    # Only devices online now: an offline one is notified when it is back, and one never
    # seen (enrolled, not connected yet) when it first connects; before that it has no
    # session on the broker, which would drop the directive. A retry waits until its last
    # directive is out of the rate window.
    where = and_(Device.online.is_(True), _spaced(step))
    return step.devices(DeviceState.PENDING, where=where, limit=budget)


def _install(step: RolloutStep, rd: RolloutDevice, device: Device, *, count_attempt: bool) -> None:
    directive = step.issuer.prepare_install(step.session, device, step.bundle, shadow=rd.shadow)
    if rd.previous_version is None and not rd.shadow:
        # What a rollback returns to: what the device served before this rollout. None
        # when it served nothing or already this version (a rollback would then take it
        # further back than this rollout moved it).
        serves = (device.model_name, device.model_version)
        if device.model_version is not None and serves != (step.bundle.name, step.bundle.version):
            rd.previous_version = device.model_version
    if count_attempt:
        rd.attempts += 1
        step.counted.add(rd.device_id)
    step.send(rd, directive, DeviceState.NOTIFIED, None)


__all__ = ["OFFLINE_MARK", "RATE_WINDOW", "notify"]
