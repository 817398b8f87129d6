"""Aborting rollouts: rollback directives, then `aborted` once no device is rolling back.

Rollback directives go to the devices that took or may take the bundle
(notified, installing, succeeded; or any other whose heartbeat says it serves
the bundle) and had a version before, and to the shadow devices. A rollback
directive names the bundle it undoes, and the agent acts only where that
bundle runs: a device serving it goes back to its previous version, one whose
install never happened (the directive was lost, or it failed) keeps what it
serves, and a shadow device stops the shadow copy and keeps serving. So shadow
devices get the rollback too, and a lost install directive cannot take a
device a version too far back. A non-shadow device without a recorded
previous version (it served nothing, or already this version) gets none and
keeps the bundle.

A device that does not confirm within `device_timeout_s` is failed (the
directive stays queued for an offline device); the rollout stops waiting.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from edgefleet.server.db.models import Device, DeviceState, RolloutDevice
from edgefleet.server.rollouts.machine import RolloutEvent
from edgefleet.server.rollouts.step import RolloutStep

NO_PREVIOUS_VERSION = "no previous version to roll back to"
# States of a device that took or may take the bundle, whatever its heartbeat says.
_MAY_HOLD_BUNDLE = frozenset({DeviceState.NOTIFIED, DeviceState.INSTALLING, DeviceState.SUCCEEDED})
# A device given up on (timed out, waiting for a retry) may still have finished the
# install late: its heartbeat says whether it serves the bundle.
_MAY_HAVE_FINISHED = (DeviceState.PENDING, DeviceState.FAILED, DeviceState.TIMED_OUT)


def drive_aborting(step: RolloutStep) -> None:
    """Send the rollbacks this tick allows; ROLLED_BACK when none is left to confirm."""
    _send_rollbacks(step)
    _give_up_unconfirmed(step)
    left = step.session.scalar(
        select(func.count()).where(
            RolloutDevice.rollout_id == step.rollout.id,
            RolloutDevice.state == DeviceState.ROLLING_BACK,
        )
    )
    if not left and step.room > 0:  # room left: every rollback was sent
        step.event(RolloutEvent.ROLLED_BACK, "every device that took the bundle is back")


def _send_rollbacks(step: RolloutStep) -> None:
    serving = (step.bundle.name, step.bundle.version)
    candidates = [
        (rd, device)
        for rd, device in step.devices(*_MAY_HOLD_BUNDLE, *_MAY_HAVE_FINISHED)
        if rd.state in _MAY_HOLD_BUNDLE or (device.model_name, device.model_version) == serving
    ]
    chosen: list[tuple[RolloutDevice, Device]] = []
    for rd, device in candidates:
        if rd.previous_version is None and not rd.shadow:
            if rd.reason != NO_PREVIOUS_VERSION:
                rd.reason = NO_PREVIOUS_VERSION
            continue
        if len(chosen) >= step.room:
            break
        chosen.append((rd, device))
    # In device id order, the order ingestion locks devices in (see notify.notify).
    for rd, device in sorted(chosen, key=lambda item: item[0].device_id):
        directive = step.issuer.prepare_rollback(step.session, device, step.bundle)
        why = "stopping the shadow copy" if rd.shadow else f"rolling back to {rd.previous_version}"
        step.send(rd, directive, DeviceState.ROLLING_BACK, why)


def _give_up_unconfirmed(step: RolloutStep) -> None:
    limit = dt.timedelta(seconds=step.plan.device_timeout_s)
    for rd, _ in step.devices(DeviceState.ROLLING_BACK):
        if rd.notified_at is not None and step.now - rd.notified_at >= limit:
            why = f"rollback not confirmed within {step.plan.device_timeout_s} s"
            step.set_state(rd, DeviceState.FAILED, why)


__all__ = ["drive_aborting"]
