"""The drift evaluator: windows of telemetry buckets judged against the stored references.

One replica evaluates: the one holding the lease "drift-evaluator". A tick
(every `drift_interval_s`) does, in one unit of work with the lease:

- the window ends at the end of the last complete telemetry bucket; a subject
  (a device serving a bundle version, or a cohort of the devices on that
  version: `edgefleet.server.drift.cohorts`) is judged again once its last
  window ended at least `drift_window` earlier, so consecutive windows do not
  overlap while data keeps coming;
- the window spans `drift_window` back from its end, widened one bucket at a
  time up to `drift_window_max` while a feature with thresholds has too few
  samples to be judged;
- one query loads a version's buckets (with each device's profile and tags);
  a cohort's buckets are its devices' buckets summed per bucket in memory;
- the bins of the window's buckets are summed per feature and judged with
  `edgefleet.driftstats.judge_window`, inputs and outputs separately (the
  false-alarm rate is shared among the features of each side);
- each judged feature, and the dataset (the inputs as a whole), has a
  `Persistence` state in `drift_states`: an alert opens after
  `drift_persistence` drifted windows in a row and resolves after as many calm
  ones. A feature without thresholds, or with too few samples, leaves its
  state alone: no evidence either way;
- a subject that sent nothing for `drift_window_max` (a device moved to
  another version, or went silent), and a cohort not judged any more (gone, as
  a finished rollout's stages, or skipped), has its open alerts resolved and
  its states forgotten.

Alert kinds: `feature-drift` (an input feature), `prediction-drift` (an output
feature), `dataset-drift` (a share of the input features at once). Device and
cohort alerts are separate (`scope`; a cohort alert names its `cohort`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from edgefleet.drift import Histogram
from edgefleet.driftstats import FeatureVerdict, Persistence, WindowVerdict, judge_window
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, Device, DriftState, TelemetryBucket
from edgefleet.server.drift.accuracy import judge_accuracy
from edgefleet.server.drift.alerts import open_alert, resolve_alert
from edgefleet.server.drift.cohorts import Cohorts, Member, judged_cohorts
from edgefleet.server.drift.reference import JudgedFeatures, Side, load_references
from edgefleet.server.leases import acquire_lease
from edgefleet.server.mqtt.aggregate import Bins, bucket_start, merge_bins
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import format_time, utcnow

log = logging.getLogger(__name__)

LEASE_NAME = "drift-evaluator"
FEATURE_DRIFT = "feature-drift"
PREDICTION_DRIFT = "prediction-drift"
DATASET_DRIFT = "dataset-drift"
ALERT_KINDS = (FEATURE_DRIFT, PREDICTION_DRIFT, DATASET_DRIFT)
DEVICE = "device"
COHORT = "cohort"


@dataclass(frozen=True)
class Subject:
    """What one window is judged for: a device on a bundle version, or a cohort of it."""

    scope: str
    key: str  # drift_states.subject: the device id, or the cohort ("version", "tag:K=V", ...)
    bundle_name: str
    bundle_version: str

    @property
    def device_id(self) -> str | None:
        return self.key if self.scope == DEVICE else None

    @property
    def cohort(self) -> str | None:
        return self.key if self.scope == COHORT else None


@dataclass
class TickReport:
    """What one tick did (for logs and tests)."""

    held: bool = False
    judged: int = 0  # windows judged
    opened: list[int] = field(default_factory=list)  # alert ids
    resolved: list[int] = field(default_factory=list)


class DriftEvaluator:
    """Judges the fleet's telemetry windows when this replica holds the lease."""

    def __init__(
        self, db: Database, settings: ServerSettings, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        # Held across ticks: a replica that evaluates keeps evaluating.
        self.lease_ttl = max(
            settings.lease_ttl, 2 * dt.timedelta(seconds=settings.drift_interval_s)
        )

    def tick(self) -> TickReport:
        """Judge every subject whose next window is due; open and resolve alerts.

        Raises:
            StorageError: the database failed (nothing of this tick is kept).
        """
        now = self.clock()
        report = TickReport()
        with self.db.session() as session:
            if not acquire_lease(
                session, LEASE_NAME, self.settings.replica_id, self.lease_ttl, now=now
            ):
                return report
            report.held = True
            end = bucket_start(now, self.settings.telemetry_bucket)
            earliest = end - self.settings.drift_window_max
            versions = _versions_with_data(session, earliest, end)
            references = load_references(session, versions)
            for (name, version), features in sorted(references.items()):
                _Version(session, self.settings, name, version, features, end, now, report).run()
            judge_accuracy(session, self.settings, end, now, report.opened, report.resolved)
            _end_silent(session, earliest, end, now, report)
        if report.opened or report.resolved:
            log.info(
                "drift: %d window(s) judged, alerts opened %s, resolved %s",
                report.judged,
                report.opened,
                report.resolved,
            )
        return report


def _versions_with_data(
    session: Session, earliest: dt.datetime, end: dt.datetime
) -> set[tuple[str, str]]:
    query = (
        select(TelemetryBucket.bundle_name, TelemetryBucket.bundle_version)
        .where(TelemetryBucket.bucket_start >= earliest, TelemetryBucket.bucket_start < end)
        .distinct()
    )
    return {(name, version) for name, version in session.execute(query)}


def _end_silent(
    session: Session, earliest: dt.datetime, end: dt.datetime, now: dt.datetime, report: TickReport
) -> None:
    """Resolve the open alerts of subjects that sent nothing since `earliest` (a device that
    moved to another version, or went silent) and forget their persistence: judging starts
    afresh when data comes back."""

    def sending(name: Any, version: Any, device_id: Any | None) -> Any:
        query = exists().where(
            TelemetryBucket.bundle_name == name,
            TelemetryBucket.bundle_version == version,
            TelemetryBucket.bucket_start >= earliest,
        )
        return query if device_id is None else query.where(TelemetryBucket.device_id == device_id)

    silent = select(Alert).where(
        Alert.resolved_at.is_(None),
        or_(
            ~sending(Alert.bundle_name, Alert.bundle_version, None),
            and_(
                Alert.device_id.is_not(None),
                ~sending(Alert.bundle_name, Alert.bundle_version, Alert.device_id),
            ),
        ),
    )
    evidence = {
        "reason": "no telemetry in the window",
        "window_start": format_time(earliest),
        "window_end": format_time(end),
    }
    for alert in session.scalars(silent):
        resolve_alert(session, alert, now, evidence)
        report.resolved.append(alert.id)
    state = DriftState
    session.execute(
        delete(state).where(
            or_(
                ~sending(state.bundle_name, state.bundle_version, None),
                and_(
                    state.scope == DEVICE,
                    ~sending(state.bundle_name, state.bundle_version, state.subject),
                ),
            )
        )
    )


_States = dict[tuple[str, str], DriftState]  # one subject's, by (kind, feature)


class _Version:
    """One tick's work on one bundle version: its devices, then its cohort."""

    def __init__(
        self,
        session: Session,
        settings: ServerSettings,
        name: str,
        version: str,
        features: JudgedFeatures,
        end: dt.datetime,
        now: dt.datetime,
        report: TickReport,
    ) -> None:
        self.session = session
        self.settings = settings
        self.name = name
        self.version = version
        self.features = features
        self.end = end
        self.now = now
        self.report = report

    def run(self) -> None:
        by_device, members = self._buckets()
        states = self._states()
        for device_id, buckets in sorted(by_device.items()):
            subject = Subject(DEVICE, device_id, self.name, self.version)
            self._judge(subject, buckets, states.setdefault((DEVICE, device_id), {}))
        cohorts = judged_cohorts(self.session, self.settings, self.name, self.version, members)
        for cohort, devices in cohorts.judged.items():
            subject = Subject(COHORT, cohort, self.name, self.version)
            buckets = _summed(by_device[device_id] for device_id in devices)
            self._judge(subject, buckets, states.setdefault((COHORT, cohort), {}), len(devices))
        self._end_unjudged_cohorts(cohorts, states)

    def _buckets(self) -> tuple[dict[str, list[tuple[dt.datetime, Bins]]], list[Member]]:
        """The version's buckets of the last `drift_window_max`, by device, and its devices."""
        query = (
            select(
                TelemetryBucket.device_id,
                TelemetryBucket.bucket_start,
                TelemetryBucket.bins,
                Device.profile,
                Device.tags,
            )
            .outerjoin(Device, Device.id == TelemetryBucket.device_id)
            .where(
                TelemetryBucket.bundle_name == self.name,
                TelemetryBucket.bundle_version == self.version,
                TelemetryBucket.bucket_start >= self.end - self.settings.drift_window_max,
                TelemetryBucket.bucket_start < self.end,
            )
        )
        by_device: dict[str, list[tuple[dt.datetime, Bins]]] = {}
        members: dict[str, Member] = {}
        for device_id, start, bins, profile, tags in self.session.execute(query):
            by_device.setdefault(device_id, []).append((start, bins))
            members[device_id] = Member(device_id, profile, tags or {})
        return by_device, list(members.values())

    def _states(self) -> dict[tuple[str, str], _States]:
        """The version's drift states by subject (scope, key), then by (kind, feature)."""
        query = select(DriftState).where(
            DriftState.bundle_name == self.name,
            DriftState.bundle_version == self.version,
            DriftState.kind.in_(ALERT_KINDS),
        )
        states: dict[tuple[str, str], _States] = {}
        for state in self.session.scalars(query):
            states.setdefault((state.scope, state.subject), {})[(state.kind, state.feature)] = state
        return states

    def _end_unjudged_cohorts(
        self, cohorts: Cohorts, states: dict[tuple[str, str], _States]
    ) -> None:
        """Resolve the open alerts of the version's cohorts not judged any more (a finished
        rollout's stages, a tag no device has now, a cohort skipped) and forget their states."""
        ended = select(Alert).where(
            Alert.scope == COHORT,
            Alert.bundle_name == self.name,
            Alert.bundle_version == self.version,
            Alert.cohort.not_in(list(cohorts.judged)),
            Alert.kind.in_(ALERT_KINDS),
            Alert.resolved_at.is_(None),
        )
        for alert in self.session.scalars(ended):
            reason = cohorts.skipped.get(alert.cohort or "", "the cohort no longer exists")
            resolve_alert(self.session, alert, self.now, {"reason": reason})
            self.report.resolved.append(alert.id)
        for (scope, key), subject_states in states.items():
            if scope == COHORT and key not in cohorts.judged:
                for state in subject_states.values():
                    self.session.delete(state)

    def _judge(
        self,
        subject: Subject,
        buckets: list[tuple[dt.datetime, Bins]],
        states: _States,
        devices: int | None = None,
    ) -> None:
        """Judge the subject's next window if due; `devices`: how many a cohort has."""
        last_end = max((state.window_end for state in states.values()), default=None)
        if last_end is not None and self.end < last_end + self.settings.drift_window:
            return  # the next window is not complete yet
        width, inputs, outputs = self._window(buckets)
        window = {
            "window_start": format_time(self.end - width),
            "window_end": format_time(self.end),
        }
        self.report.judged += 1
        for check in _checks(inputs, outputs, window, devices):
            self._apply(subject, check, states)

    def _apply(
        self,
        subject: Subject,
        check: _Check,
        states: _States,
    ) -> None:
        """Step the check's persistence; open or resolve its alert when it says so."""
        key = (check.kind, check.feature)
        state = states.get(key)
        if state is None:
            state = DriftState(
                scope=subject.scope,
                subject=subject.key,
                bundle_name=self.name,
                bundle_version=self.version,
                kind=check.kind,
                feature=check.feature,
                persistence=dict(Persistence(self.settings.drift_persistence).to_json()),
            )
            self.session.add(state)
            states[key] = state
        persistence = Persistence.from_json(state.persistence)
        persistence.windows = self.settings.drift_persistence  # the setting may have changed
        transition = persistence.update(check.drifted)
        state.persistence = dict(persistence.to_json())
        state.window_end = self.end
        state.statistic = check.statistic
        state.threshold = check.threshold
        state.drifted = check.drifted
        if transition == "open":
            self._open(subject, check)
        elif transition == "close":
            self._resolve(subject, check)

    def _window(
        self, buckets: list[tuple[dt.datetime, Bins]]
    ) -> tuple[dt.timedelta, WindowVerdict, WindowVerdict]:
        """The narrowest window (from drift_window, a bucket wider each time, up to
        drift_window_max) in which every feature with thresholds can be judged."""
        step = self.settings.telemetry_bucket
        width = max(self.settings.drift_window, step)
        while True:
            summed: Bins = {}
            for start, bins in buckets:
                if start >= self.end - width:
                    merge_bins(summed, bins)
            inputs = _judge_side(self.features.inputs, summed.get("inputs", {}))
            outputs = _judge_side(self.features.outputs, summed.get("outputs", {}))
            if width + step > self.settings.drift_window_max or not _wants_more(
                (inputs, outputs), (self.features.inputs, self.features.outputs)
            ):
                return width, inputs, outputs
            width += step

    def _open(self, subject: Subject, check: _Check) -> None:
        alert = Alert(
            kind=check.kind,
            scope=subject.scope,
            device_id=subject.device_id,
            cohort=subject.cohort,
            bundle_name=subject.bundle_name,
            bundle_version=subject.bundle_version,
            feature=check.feature or None,
            opened_at=self.now,
            evidence=check.evidence,
        )
        open_alert(self.session, alert)
        self.report.opened.append(alert.id)

    def _resolve(self, subject: Subject, check: _Check) -> None:
        query = select(Alert).where(
            Alert.scope == subject.scope,
            Alert.device_id == subject.device_id
            if subject.scope == DEVICE
            else Alert.cohort == subject.cohort,
            Alert.bundle_name == subject.bundle_name,
            Alert.bundle_version == subject.bundle_version,
            Alert.kind == check.kind,
            Alert.feature.is_(None) if not check.feature else Alert.feature == check.feature,
            Alert.resolved_at.is_(None),
        )
        for alert in self.session.scalars(query):
            resolve_alert(self.session, alert, self.now, check.evidence)
            self.report.resolved.append(alert.id)


@dataclass(frozen=True)
class _Check:
    """One persistence step of a window: a feature's verdict, or the dataset's."""

    kind: str
    feature: str  # "" for the dataset
    drifted: bool
    evidence: dict[str, Any]
    statistic: float | None = None
    threshold: float | None = None


def _checks(
    inputs: WindowVerdict, outputs: WindowVerdict, window: dict[str, str], devices: int | None
) -> list[_Check]:
    """The checks a window gives: every judged feature, and the dataset when one input was."""
    extra: dict[str, Any] = {**window, **({} if devices is None else {"devices": devices})}
    checks = [
        _Check(
            kind,
            verdict.feature,
            verdict.status == "drift",
            {**_feature_evidence(verdict), **extra},
            verdict.statistic,
            verdict.threshold,
        )
        for kind, side in ((FEATURE_DRIFT, inputs), (PREDICTION_DRIFT, outputs))
        for verdict in side.features
        if verdict.status != "insufficient"
    ]
    judged = [verdict for verdict in inputs.features if verdict.status != "insufficient"]
    if judged:
        evidence = {
            "drifted": inputs.drifted,
            "features_judged": len(judged),
            "samples": min(verdict.samples for verdict in judged),
            **extra,
        }
        checks.append(_Check(DATASET_DRIFT, "", inputs.dataset_drift, evidence))
    return checks


def _summed(
    per_device: Iterable[list[tuple[dt.datetime, Bins]]],
) -> list[tuple[dt.datetime, Bins]]:
    """Devices' buckets summed per bucket start."""
    summed: dict[dt.datetime, Bins] = {}
    for buckets in per_device:
        for start, bins in buckets:
            merge_bins(summed.setdefault(start, {}), bins)
    return sorted(summed.items())


def _judge_side(reference: Side, live_bins: dict[str, dict[str, Any]]) -> WindowVerdict:
    live: dict[str, Histogram] = {}
    for name, counted in live_bins.items():
        if name not in reference:
            continue
        try:
            live[name] = Histogram(
                edges=reference[name][0].edges,
                counts=counted["counts"],
                below=counted["below"],
                above=counted["above"],
                nan=counted["nan"],
            )
        except (ValidationError, KeyError):
            log.debug("live counts of %s do not fit its reference bins: not judged", name)
    return judge_window(reference, live)


def _wants_more(verdicts: Iterable[WindowVerdict], references: Iterable[Side]) -> bool:
    """True when a feature that has thresholds was not judged for want of samples."""
    return any(
        verdict.status == "insufficient" and reference[verdict.feature][1] is not None
        for window, reference in zip(verdicts, references, strict=True)
        for verdict in window.features
    )


def _feature_evidence(verdict: FeatureVerdict) -> dict[str, Any]:
    evidence: dict[str, Any] = {
        "feature": verdict.feature,
        "statistic": verdict.statistic,
        "threshold": verdict.threshold,
        "samples": verdict.samples,
        "psi": verdict.psi,
        "js": verdict.js,
    }
    if verdict.outside is not None:
        evidence["outside"] = asdict(verdict.outside)
    return evidence


__all__ = [
    "ALERT_KINDS",
    "COHORT",
    "DATASET_DRIFT",
    "DEVICE",
    "FEATURE_DRIFT",
    "LEASE_NAME",
    "PREDICTION_DRIFT",
    "DriftEvaluator",
    "Subject",
    "TickReport",
]
