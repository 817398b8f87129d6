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
`Device.online`, `TelemetryBucket` rows, open drift `Alert` rows and the
bundle's reference accuracy, in a few aggregate queries (no per-device round
trips), so it stays cheap for stages of thousands of devices. The traffic and
label counts come from the buckets' running sums (`edgefleet.server.spans`): two
buckets a device, however long the stage has run. The latency histograms, which
are merged here rather than summed, are read from the newest buckets only
(`latency_lookback`).

Pure helpers (`merge_latency`, `latency_percentile`) are separate from the
queries so they are tested on their own.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Sequence
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
    TelemetryBucket,
    TelemetryLatest,
)
from edgefleet.server.drift.accuracy import Labelled, reference_accuracy
from edgefleet.server.drift.cohorts import stage_cohort
from edgefleet.server.drift.evaluator import (
    COHORT,
    DATASET_DRIFT,
    DEVICE,
    FEATURE_DRIFT,
    PREDICTION_DRIFT,
)
from edgefleet.server.rollouts.gates import Drifting, StageCounts
from edgefleet.server.spans import SpanSums, span_sums
from edgefleet.timefmt import format_time, parse_time

FINISHED = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT})
AWAITING_INSTALL = frozenset({DeviceState.NOTIFIED, DeviceState.INSTALLING})

# The agent's resting install states (agent/install/states.py: TERMINAL minus idle).
AGENT_SUCCESS = frozenset({"committed"})
# "rolled_back" is not a state of today's agent; accepted for agents that rest there.
# "refused" is not a state either: the report of a refusal (the agent rests as before).
AGENT_FAILURE = frozenset({"failed", "refused", "rolled_back"})

# The p95 latencies read the newest buckets: far enough back for about
# LATENCY_SAMPLE_BUCKETS device-buckets (all of a day for a canary of a few
# devices, the last two buckets for a stage of 10,000), never further than
# LATENCY_WINDOW. So a status costs the same on the stage's first day as later.
LATENCY_WINDOW = dt.timedelta(hours=24)
LATENCY_SAMPLE_BUCKETS = 10_000
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
) -> StageCounts:
    """What the gates of stage `stage_index` judge (see `gates.StageCounts`).

    Telemetry counts are of buckets that may hold windows since the stage
    started (`bucket_start > stage_started_at - bucket`) on the stage's own
    devices: for the new version in a normal stage; in a shadow stage the
    serving version's windows carry the challenger's comparisons, so shadow
    counts come from every version of the bundle's name.
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
    elapsed = max(dt.timedelta(0), now - started)
    since = started - bucket
    of_stage = and_(
        TelemetryLatest.device_id == RolloutDevice.device_id,
        in_stage,
        TelemetryLatest.bundle_name == bundle.name,
    )
    new_version = span_sums(
        session,
        and_(of_stage, TelemetryLatest.bundle_version == bundle.version),
        first=lambda start: start > since,
    )
    lookback = latency_lookback(assigned, bucket)
    latency = merge_latency(
        session.scalars(
            select(TelemetryBucket.latency).where(
                TelemetryBucket.device_id == RolloutDevice.device_id,
                in_stage,
                TelemetryBucket.bundle_name == bundle.name,
                TelemetryBucket.bundle_version == bundle.version,
                TelemetryBucket.bucket_start > max(since, now - lookback),
            )
        ).all()
    )
    previous_version = and_(
        TelemetryBucket.device_id == RolloutDevice.device_id,
        in_stage,
        TelemetryBucket.bundle_name == bundle.name,
        TelemetryBucket.bundle_version == RolloutDevice.previous_version,
        TelemetryBucket.bucket_start < started,
    )
    previous = merge_latency(
        session.scalars(
            select(TelemetryBucket.latency).where(
                previous_version, TelemetryBucket.bucket_start >= started - lookback
            )
        ).all()
    )
    previous_labels = span_sums(
        session,
        and_(of_stage, TelemetryLatest.bundle_version == RolloutDevice.previous_version),
        first=lambda start: start >= started - elapsed,
        last=lambda start: start < started,
    )
    drifting, cohort_drift = _open_drift(session, rollout, bundle, stage_index, started)
    # In a shadow stage the serving version's windows carry the challenger's comparisons.
    compared = (
        span_sums(session, of_stage, first=lambda start: start > since, active="shadow_requests")
        if shadow
        else None
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
        reporting=(compared or new_version).active,
        requests=new_version.count("requests"),
        errors=new_version.count("errors"),
        fallbacks=new_version.count("fallbacks"),
        latency_p95_ms=latency_percentile(latency, 0.95),
        previous_latency_p95_ms=latency_percentile(previous, 0.95),
        latency_minutes=round(lookback.total_seconds() / 60),
        shadow_requests=compared.count("shadow_requests") if compared else 0,
        shadow_agreements=compared.count("shadow_agreements") if compared else 0,
        drifting=drifting,
        cohort_drift=cohort_drift,
        labels=_labelled(new_version),
        previous_labels=_labelled(previous_labels),
        reference=reference_accuracy(bundle),
        stage_elapsed_s=elapsed.total_seconds(),
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


def _labelled(sums: SpanSums) -> Labelled:
    """The labelled feedback in span sums."""
    return Labelled(
        sums.count("labelled_count"),
        sums.count("labelled_correct"),
        float(sums.sums["labelled_abs_error"]),
        float(sums.sums["labelled_squared_error"]),
    )


def latency_lookback(devices: int, bucket: dt.timedelta) -> dt.timedelta:
    """How far back a stage's p95 latencies read, for a stage of `devices` devices.

    About `LATENCY_SAMPLE_BUCKETS` device-buckets (a device stores one bucket a
    `bucket` per version), at least two buckets (the open one and the last
    whole one), at most `LATENCY_WINDOW`.
    """
    wanted = bucket * (LATENCY_SAMPLE_BUCKETS / max(devices, 1))
    return min(LATENCY_WINDOW, max(2 * bucket, wanted))


Histogram = tuple[list[float], list[int]]


def merge_latency(histograms: Sequence[dict[str, Any] | None]) -> Histogram | None:
    """Add latency histograms ({"bounds_ms", "counts"}) that share the most common bounds.

    Histograms with other bounds (another agent version) are left out rather
    than mixed in; None when there is nothing to merge.
    """
    groups: dict[tuple[float, ...], list[int]] = {}
    for item in histograms:
        if not item:
            continue
        bounds, counts = item.get("bounds_ms"), item.get("counts")
        if not isinstance(bounds, list) or not isinstance(counts, list):
            continue
        if len(counts) != len(bounds) + 1:
            continue
        key = tuple(bounds)  # 5 and 5.0 are one key: equal numbers hash alike
        total = groups.get(key)
        added = map(int, counts)
        groups[key] = list(added) if total is None else list(map(operator.add, total, added))
    if not groups:
        return None
    best = max(groups, key=lambda key: sum(groups[key]))
    return [float(bound) for bound in best], groups[best]


def latency_percentile(histogram: Histogram | None, quantile: float) -> float | None:
    """The bound at or below which `quantile` of the requests fell (ms); None when empty.

    Requests in the overflow bin are reported as the highest bound: a lower
    bound of the true value, which is what a ratio against the previous
    version's histogram (same bounds) needs.
    """
    if histogram is None:
        return None
    bounds, counts = histogram
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    needed = quantile * total
    running = 0
    for i, count in enumerate(counts):
        running += count
        if running >= needed:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


__all__ = [
    "AGENT_FAILURE",
    "AGENT_SUCCESS",
    "AWAITING_INSTALL",
    "FINISHED",
    "DeviceState",
    "heartbeat_answer",
    "latency_lookback",
    "latency_percentile",
    "merge_latency",
    "reconcile",
    "stage_counts",
    "state_counts",
    "unchecked_counts",
]
