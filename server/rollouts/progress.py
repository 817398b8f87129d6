"""A rollout's progress, read from what ingestion stored: device states and stage counts.

`reconcile` moves each `RolloutDevice` waiting for an answer according to the
newest status report that answers its directive (`StatusReportRow.directive_sequence
== RolloutDevice.directive_sequence`): a report for an older directive never
moves it. The agent's install states (agent/install/states.py) end in
`committed` (installed, already current, a shadow install running as the
challenger, or a requested rollback done), `failed` (a failed install rolled
back) or `refused` (the bundle or the rollback was refused, nothing changed on
the device: its reason names the code, such as `below-security-floor`); every
other state is on the way.

A report can be lost (the server killed before it was ingested), so `reconcile`
also settles a device from its newest heartbeat, which devices sign like their
reports and which restates what the device serves, its install state and its
answer to the last directive it rests after: see `heartbeat_answer` for
exactly what it must say. Both kinds of answer move the
device through `_answer` and `_move`, and only while it still waits for one:
a device settled by its heartbeat ignores the late report of the same outcome,
so nothing is applied or counted twice.

`unchecked_counts` counts the succeeded devices whose install committed
without a health check under live traffic (the agent's reason says so).

`stage_counts` gathers `gates.StageCounts` for one stage from the device rows,
`Device.online`, open drift `Alert` rows, the bundle's reference accuracy and
the stage's telemetry (stagetelemetry.py), in a few aggregate queries (no
per-device round trips), so it stays cheap for stages of thousands of devices.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from edgefleet.errors import MalformedDocumentError
from edgefleet.server.db.models import (
    Alert,
    BundleRow,
    Device,
    DeviceState,
    Rollout,
    RolloutDevice,
    StatusReportRow,
)
from edgefleet.server.drift.accuracy import reference_accuracy
from edgefleet.server.drift.cohorts import stage_cohort
from edgefleet.server.drift.evaluator import (
    COHORT,
    DATASET_DRIFT,
    DEVICE,
    FEATURE_DRIFT,
    PREDICTION_DRIFT,
)
from edgefleet.server.rollouts.gates import Drifting, StageCounts
from edgefleet.server.rollouts.stagetelemetry import (
    StageTelemetry,
    StageTelemetryCache,
    read_stage_telemetry,
    stage_key,
)
from edgefleet.timefmt import format_time, parse_time

FINISHED = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT})
AWAITING_INSTALL = frozenset({DeviceState.NOTIFIED, DeviceState.INSTALLING})

# The agent's resting install states (agent/install/states.py: TERMINAL minus idle).
AGENT_SUCCESS = frozenset({"committed"})
# "rolled_back" is not a state of today's agent; accepted for agents that rest there.
# "refused" is not a state either: the report of a refusal (the agent rests as before).
AGENT_FAILURE = frozenset({"failed", "refused", "rolled_back"})

DRIFT_KINDS = (FEATURE_DRIFT, PREDICTION_DRIFT, DATASET_DRIFT)  # what the drift gate counts

# What the agent's COMMITTED reason says when no live request judged the new
# version (agent/install/health.py): no traffic during the check, or no
# predictor running to observe.
UNCHECKED_NOTES = ("committed unchecked", "committed without a health check")


def reconcile(session: Session, rollout: Rollout, now: dt.datetime) -> int:
    """Apply the newest answers to `rollout`'s directives; returns how many devices moved.

    notified/installing -> succeeded (committed: the agent's note kept), failed
    (failed: reason kept), or installing (any other state); rolling_back ->
    rolled_back (committed) or failed (the rollback failed). Status reports
    first, then the heartbeats of the devices still waiting (`heartbeat_answer`).
    """
    watched = [DeviceState.NOTIFIED, DeviceState.INSTALLING, DeviceState.ROLLING_BACK]
    rows = session.execute(
        select(
            RolloutDevice,
            StatusReportRow.install_state,
            StatusReportRow.reason,
            StatusReportRow.received_at,
        )
        .join(
            StatusReportRow,
            and_(
                StatusReportRow.device_id == RolloutDevice.device_id,
                StatusReportRow.directive_sequence == RolloutDevice.directive_sequence,
            ),
        )
        .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.state.in_(watched))
        .order_by(RolloutDevice.device_id, StatusReportRow.sequence)
    ).all()
    newest: dict[str, tuple[RolloutDevice, str, str | None, dt.datetime]] = {}
    for rd, state, reason, received in rows:
        newest[rd.device_id] = (rd, state, reason, received)  # ordered: the last one wins
    moved = sum(
        _move(rd, agent_state, reason, min(received, now))
        for rd, agent_state, reason, received in newest.values()
    )
    bundle = session.get(BundleRow, rollout.bundle_id)
    assert bundle is not None  # a foreign key
    restated = session.execute(
        select(RolloutDevice, Device.heartbeat)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(
            RolloutDevice.rollout_id == rollout.id,
            RolloutDevice.state.in_(watched),
            Device.heartbeat.is_not(None),
        )
    ).all()
    for rd, heartbeat in restated:
        answer = heartbeat_answer(rd, bundle, heartbeat)
        if answer is not None:
            moved += _move(rd, answer[0], answer[1], now)
    return moved


def heartbeat_answer(
    rd: RolloutDevice, bundle: BundleRow, heartbeat: dict[str, Any] | None
) -> tuple[str, str] | None:
    """The answer (agent state, reason) the device's newest heartbeat gives `rd`'s directive.

    A heartbeat answers only when it was sent (`sent_at`, whole seconds) at or
    after the directive was issued (`notified_at`), and then in one of two ways:

    - its `answered` names the directive (`sequence`) with a resting outcome
      (`committed`, `failed` or `refused`): the outcome and reason of the lost
      report, shadow installs included; agents that predate `answered` do not
      send it;
    - else its install state is `committed` and it serves, for an install, the
      rollout's bundle (name and version), or for a rollback, the bundle's name
      at the version rolled back to. That is what the lost `committed` report
      would have said: a device that already served the version commits an
      install at once, and one that never took the bundle keeps what it serves
      on a rollback. A shadow install leaves the served version alone, so this
      way never settles a shadow device.
    """
    if not heartbeat or rd.notified_at is None:
        return None
    try:
        sent_at = parse_time(str(heartbeat.get("sent_at")))
    except MalformedDocumentError:
        return None
    if sent_at < rd.notified_at.replace(microsecond=0):
        return None
    restated = f"restated by the heartbeat of {format_time(sent_at)}"
    answered = heartbeat.get("answered")
    if isinstance(answered, dict) and answered.get("sequence") == rd.directive_sequence:
        outcome = answered.get("install_state")
        if outcome in AGENT_SUCCESS | AGENT_FAILURE:
            return str(outcome), f"{answered.get('reason') or outcome} ({restated})"
    if rd.shadow or heartbeat.get("install_state") != "committed":
        return None
    served = (heartbeat.get("model_name"), heartbeat.get("model_version"))
    wanted = rd.previous_version if rd.state is DeviceState.ROLLING_BACK else bundle.version
    if wanted is None or served != (bundle.name, wanted):
        return None
    return "committed", f"the heartbeat of {format_time(sent_at)} restates {bundle.name}@{wanted}"


def _move(rd: RolloutDevice, agent_state: str, reason: str | None, at: dt.datetime) -> int:
    """Move `rd` as the agent's answer leads (see `_answer`); 1 if it moved, else 0."""
    target, why = _answer(rd.state, agent_state, reason)
    if target is None or (target is rd.state and why == rd.reason):
        return 0
    rd.state = target
    rd.reason = why
    rd.updated_at = at
    return 1


def _answer(
    current: DeviceState, agent_state: str, reason: str | None
) -> tuple[DeviceState | None, str | None]:
    """The device state an agent's report leads to, and the reason to keep."""
    if current is DeviceState.ROLLING_BACK:
        if agent_state in AGENT_SUCCESS:
            return DeviceState.ROLLED_BACK, reason
        if agent_state in AGENT_FAILURE:
            return DeviceState.FAILED, f"the rollback failed: {reason or agent_state}"
        return None, None
    if agent_state in AGENT_SUCCESS:
        return DeviceState.SUCCEEDED, reason  # the agent's note: how its health check judged it
    if agent_state in AGENT_FAILURE:
        return DeviceState.FAILED, reason or f"the device reported {agent_state}"
    return DeviceState.INSTALLING, f"the device reported {agent_state}"


def unchecked_counts(session: Session, rollout_id: int) -> dict[int, int]:
    """Succeeded devices per stage index whose install committed unchecked.

    The agent commits an install that no live request could judge (an idle
    device, or no predictor running) and says so in the COMMITTED report's
    reason (agent/install/health.py); `reconcile` keeps that reason. Stages
    without such devices are left out.
    """
    notes = [RolloutDevice.reason.contains(note, autoescape=True) for note in UNCHECKED_NOTES]
    rows = session.execute(
        select(RolloutDevice.stage_index, func.count())
        .where(
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.state == DeviceState.SUCCEEDED,
            or_(*notes),
        )
        .group_by(RolloutDevice.stage_index)
    ).all()
    return {int(index): int(count) for index, count in rows}


def state_counts(
    session: Session, rollout_id: int, stage_index: int | None = None
) -> dict[str, int]:
    """Devices per state (every state present, zeros included), of one stage or all."""
    query = (
        select(RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.state)
    )
    if stage_index is not None:
        query = query.where(RolloutDevice.stage_index == stage_index)
    counts = {state.value: 0 for state in DeviceState}
    for state, count in session.execute(query).all():
        counts[state.value] = int(count)
    return counts


def stage_counts(
    session: Session,
    rollout: Rollout,
    bundle: BundleRow,
    stage_index: int,
    *,
    shadow: bool,
    now: dt.datetime,
    bucket: dt.timedelta = dt.timedelta(minutes=5),
    telemetry: StageTelemetryCache | None = None,
) -> StageCounts:
    """What the gates of stage `stage_index` judge (see `gates.StageCounts`).

    The device states and drift alerts are read afresh; the telemetry through
    `telemetry` where given, which keeps a large stage's reading a few seconds
    (`stagetelemetry.read_stage_telemetry`, and its cache), else afresh.
    """
    in_stage = and_(
        RolloutDevice.rollout_id == rollout.id,
        RolloutDevice.stage_index == stage_index,
        RolloutDevice.state != DeviceState.SKIPPED,
    )
    states = state_counts(session, rollout.id, stage_index)
    assigned = sum(n for state, n in states.items() if state != DeviceState.SKIPPED)
    offline = session.scalar(
        select(func.count())
        .select_from(RolloutDevice)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(in_stage, Device.online.is_(False), RolloutDevice.state.not_in(FINISHED))
    )
    last_finished = session.scalar(
        select(func.max(RolloutDevice.updated_at)).where(
            in_stage, RolloutDevice.state.in_(FINISHED)
        )
    )
    finished = sum(states[state] for state in FINISHED)
    since_finish = None if last_finished is None else (now - last_finished).total_seconds()
    started = rollout.stage_started_at or now
    drifting, cohort_drift = _open_drift(session, rollout, bundle, stage_index, started)

    def reading() -> StageTelemetry:
        return read_stage_telemetry(
            session,
            rollout,
            bundle,
            in_stage,
            shadow=shadow,
            devices=assigned,
            now=now,
            bucket=bucket,
        )

    reported = (
        reading()
        if telemetry is None
        else telemetry.read(stage_key(rollout, stage_index, shadow), now, reading)
    )
    return StageCounts(
        assigned=assigned,
        pending=states[DeviceState.PENDING],
        notified=states[DeviceState.NOTIFIED],
        installing=states[DeviceState.INSTALLING],
        succeeded=states[DeviceState.SUCCEEDED],
        failed=states[DeviceState.FAILED],
        timed_out=states[DeviceState.TIMED_OUT],
        offline=int(offline or 0),
        reporting=reported.reporting,
        requests=reported.requests,
        errors=reported.errors,
        fallbacks=reported.fallbacks,
        latency_p95_ms=reported.latency_p95_ms,
        previous_latency_p95_ms=reported.previous_latency_p95_ms,
        latency_minutes=reported.latency_minutes,
        shadow_requests=reported.shadow_requests,
        shadow_agreements=reported.shadow_agreements,
        drifting=drifting,
        cohort_drift=cohort_drift,
        labels=reported.labels,
        previous_labels=reported.previous_labels,
        telemetry_read_at=reported.read_at,
        reference=reference_accuracy(bundle),
        stage_elapsed_s=max(dt.timedelta(0), now - started).total_seconds(),
        settled_elapsed_s=since_finish if assigned and finished == assigned else None,
        success_elapsed_s=since_finish,
    )


def _open_drift(
    session: Session,
    rollout: Rollout,
    bundle: BundleRow,
    stage_index: int,
    started: dt.datetime,
) -> tuple[tuple[Drifting, ...], tuple[str, ...]]:
    """The stage's installed devices with open drift alerts of the bundle's version opened
    since the stage started (with their features), and the stage cohort's drifting features."""
    open_drift = and_(
        Alert.kind.in_(DRIFT_KINDS),
        Alert.bundle_name == bundle.name,
        Alert.bundle_version == bundle.version,
        Alert.resolved_at.is_(None),
        Alert.opened_at >= started,
    )
    rows = session.execute(
        select(Alert.device_id, Alert.feature)
        .join(RolloutDevice, RolloutDevice.device_id == Alert.device_id)
        .where(
            open_drift,
            Alert.scope == DEVICE,
            RolloutDevice.rollout_id == rollout.id,
            RolloutDevice.stage_index == stage_index,
            RolloutDevice.state == DeviceState.SUCCEEDED,
        )
    ).all()
    features: dict[str, set[str]] = {}
    for device_id, feature in rows:
        features.setdefault(str(device_id), set()).add(feature or "dataset")
    drifting = tuple(Drifting(d, tuple(sorted(features[d]))) for d in sorted(features))
    cohort = session.scalars(
        select(Alert.feature).where(
            open_drift, Alert.scope == COHORT, Alert.cohort == stage_cohort(rollout.id, stage_index)
        )
    ).all()
    return drifting, tuple(sorted({feature or "dataset" for feature in cohort}))


__all__ = [
    "AGENT_FAILURE",
    "AGENT_SUCCESS",
    "AWAITING_INSTALL",
    "FINISHED",
    "DeviceState",
    "heartbeat_answer",
    "reconcile",
    "stage_counts",
    "state_counts",
    "unchecked_counts",
]
