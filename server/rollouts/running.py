"""Running rollouts: retries, timeouts, and the stage's gates.

In order, for a running rollout whose device states were just reconciled:
1. failed and timed-out devices with attempts left go back to pending;
2. devices notified `device_timeout_s` ago that are online and gave no final
   answer time out (and go back to pending while they have attempts left);
3. late joiners and skipped devices whose other rollout ended join the
   current stage (joining.py);
4. devices are notified, within the rate limit (notify.py);
5. the current stage's gates are judged: ADVANCE begins the next stage (its
   devices recorded pending, or skipped; after a shadow stage the shadow
   devices get a real install), the last stage COMPLETEs, FAIL pauses or
   aborts per plan.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_

from edgefleet.server.db.models import Device, DeviceState, RolloutDevice
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.rollouts.gates import GateDecision, evaluate_stage
from edgefleet.server.rollouts.joining import admit_late_joiners, admit_skipped
from edgefleet.server.rollouts.machine import RolloutEvent
from edgefleet.server.rollouts.notify import notify
from edgefleet.server.rollouts.progress import stage_counts
from edgefleet.server.rollouts.selection import order_selection
from edgefleet.server.rollouts.service import add_stage_devices, select_devices
from edgefleet.server.rollouts.step import RolloutStep


def drive_running(step: RolloutStep) -> None:
    """One tick of a running rollout (see the module's docstring)."""
    _retry(step)
    _time_out(step)
    admit_late_joiners(step)
    admit_skipped(step)
    notify(step)
    _judge(step)


def _retry(step: RolloutStep) -> None:
    plan = step.plan
    attempts_left = RolloutDevice.attempts <= plan.max_retries
    for rd, _ in step.devices(DeviceState.FAILED, DeviceState.TIMED_OUT, where=attempts_left):
        why = f"retry {rd.attempts} of {plan.max_retries} after: {rd.reason}"
        step.set_state(rd, DeviceState.PENDING, why)


def _time_out(step: RolloutStep) -> None:
    """Online devices with no final answer `device_timeout_s` after their directive."""
    plan = step.plan
    since = step.now - dt.timedelta(seconds=plan.device_timeout_s)
    late = and_(Device.online.is_(True), RolloutDevice.notified_at <= since)
    for rd, _ in step.devices(DeviceState.NOTIFIED, DeviceState.INSTALLING, where=late):
        why = f"no final answer {plan.device_timeout_s} s after the directive"
        step.set_state(rd, DeviceState.TIMED_OUT, why)
        if rd.attempts <= plan.max_retries:
            step.set_state(rd, DeviceState.PENDING, f"retry after: {why}")


def _judge(step: RolloutStep) -> None:
    index = step.rollout.stage_index
    stage = step.plan.stages[index]
    counts = stage_counts(
        step.session,
        step.rollout,
        step.bundle,
        index,
        shadow=stage.shadow,
        now=step.now,
        bucket=step.settings.telemetry_bucket,
        telemetry=step.telemetry,
    )
    verdict = evaluate_stage(step.plan.stage_gates(index), counts, shadow=stage.shadow)
    name = step.plan.stage_name(index)
    if verdict.decision is GateDecision.FAIL:
        step.event(RolloutEvent.GATE_FAILED, f"{name}: " + "; ".join(verdict.reasons))
    elif verdict.decision is GateDecision.ADVANCE:
        if index + 1 >= len(step.plan.stages):
            step.event(RolloutEvent.COMPLETE, f"{name} passed its gates")
        elif step.event(RolloutEvent.ADVANCE, f"{name} passed its gates"):
            _begin_stage(step, index + 1, after_shadow=stage.shadow)


def _begin_stage(step: RolloutStep, index: int, *, after_shadow: bool) -> None:
    selection = order_selection(
        step.rollout.id, select_devices(step.session, step.bundle, step.rollout.selector)
    )
    try:
        add_stage_devices(step.session, step.rollout, step.plan, index, selection, step.now)
    except InvalidRequestError as exc:  # a named device left the selection
        step.event(RolloutEvent.PAUSE, f"cannot begin {step.plan.stage_name(index)}: {exc}")
        return
    if not after_shadow or step.plan.stages[index].shadow:
        return
    taken_part = (
        DeviceState.SUCCEEDED,
        DeviceState.FAILED,
        DeviceState.TIMED_OUT,
        DeviceState.NOTIFIED,
        DeviceState.INSTALLING,
        DeviceState.PENDING,
    )
    for rd, _ in step.devices(*taken_part, where=RolloutDevice.shadow.is_(True)):
        rd.shadow = False
        rd.stage_index = index
        rd.attempts = 0
        rd.directive_sequence = None
        step.set_state(rd, DeviceState.PENDING, "ran in shadow; now installs for real")


__all__ = ["drive_running"]
