"""Accuracy from labelled feedback: the reference figure, sums over buckets, and the drop alert.

The reference is the shipped candidate's figure in the converter's report
(`bundles.report`): `accuracy` (the report gives percent; here a share 0..1)
for classifiers, `rmse` for regressors. Devices send labelled counts (and for
regression the sums of |error| and error squared) per telemetry window; the
server sums them in `telemetry_buckets`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.bundle import Manifest
from edgefleet.bundlefiles import REPORT_FILE
from edgefleet.driftstats import Persistence
from edgefleet.server.db.models import Alert, BundleRow, DriftState, TelemetryBucket
from edgefleet.server.drift.alerts import open_alert, resolve_alert
from edgefleet.server.drift.cohorts import Cohorts, judged_cohorts, version_members
from edgefleet.server.drift.reference import member_bytes
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import format_time

ACCURACY_DROP = "accuracy-drop"  # alert kind
DEVICE = "device"
COHORT = "cohort"
MAX_REPORT_BYTES = 1024 * 1024  # a larger report.json is not stored


def read_report(bundle: Path, manifest: Manifest) -> tuple[dict[str, Any] | None, str | None]:
    """The converter's report of the verified bundle at `bundle` (None: it has none, or it
    is unusable), and why it is unusable (None when it is not).

    Raises:
        OSError: the file cannot be read.
    """
    entry = manifest.files_by_path().get(REPORT_FILE)
    if entry is None:
        return None, None
    if entry.length > MAX_REPORT_BYTES:
        return None, f"{REPORT_FILE} is {entry.length} bytes, over {MAX_REPORT_BYTES}"
    data = member_bytes(bundle, REPORT_FILE)
    if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        return None, f"{REPORT_FILE} changed since the bundle was verified"
    try:
        report = json.loads(data)
    except ValueError as exc:  # not UTF-8, not JSON, or a number beyond Python's limit
        return None, f"{REPORT_FILE} is not JSON: {exc}"
    if not isinstance(report, dict):
        return None, f"{REPORT_FILE} is a JSON {type(report).__name__}, not an object"
    return report, None


@dataclass(frozen=True)
class ReferenceAccuracy:
    """The version's own figure: accuracy as a share 0..1, or rmse in the output's unit."""

    metric: Literal["accuracy", "rmse"]
    value: float


def reference_accuracy(bundle: BundleRow) -> ReferenceAccuracy | None:
    """The shipped candidate's figure from `bundle.report`; None without a report or a figure."""
    return report_reference(bundle.report)


def report_reference(report: Any) -> ReferenceAccuracy | None:
    """The chosen candidate's accuracy (or rmse) in a converter report, when it has one."""
    if not isinstance(report, dict):
        return None
    chosen, rows = report.get("chosen"), report.get("candidates")
    if not isinstance(chosen, str) or not isinstance(rows, list):
        return None
    for row in rows:
        if not isinstance(row, dict) or row.get("name") != chosen:
            continue
        metrics = row.get("metrics")
        if not isinstance(metrics, dict):
            return None
        accuracy, rmse = _number(metrics.get("accuracy")), _number(metrics.get("rmse"))
        if accuracy is not None and 0 <= accuracy <= 100:
            return ReferenceAccuracy("accuracy", accuracy / 100)
        if rmse is not None and rmse >= 0:
            return ReferenceAccuracy("rmse", rmse)
        return None
    return None


@dataclass(frozen=True)
class Labelled:
    """Labelled feedback summed over buckets: answers labelled, class labels right, and
    for regression feedback the sums of |error| and error squared."""

    count: int = 0
    correct: int = 0
    abs_error: float = 0.0
    squared_error: float = 0.0

    def __add__(self, other: Labelled) -> Labelled:
        return Labelled(
            self.count + other.count,
            self.correct + other.correct,
            self.abs_error + other.abs_error,
            self.squared_error + other.squared_error,
        )

    @property
    def regression(self) -> bool:
        return self.abs_error > 0 or self.squared_error > 0

    def figures(self) -> dict[str, float | None]:
        """accuracy (share), mae and rmse over the labelled answers; None without labels."""
        if not self.count:
            return {"accuracy": None, "mae": None, "rmse": None}
        if self.regression:
            return {
                "accuracy": None,
                "mae": self.abs_error / self.count,
                "rmse": math.sqrt(self.squared_error / self.count),
            }
        return {"accuracy": self.correct / self.count, "mae": None, "rmse": None}


def labelled_by_device(
    session: Session,
    bundle_name: str,
    bundle_version: str,
    start: dt.datetime,
    end: dt.datetime,
    devices: Iterable[str] | None = None,
) -> dict[str, Labelled]:
    """Each device's labelled feedback on one bundle version, buckets starting in [start, end)."""
    bucket = TelemetryBucket
    query = (
        select(
            bucket.device_id,
            func.sum(bucket.labelled_count),
            func.sum(bucket.labelled_correct),
            func.sum(bucket.labelled_abs_error),
            func.sum(bucket.labelled_squared_error),
        )
        .where(
            bucket.bundle_name == bundle_name,
            bucket.bundle_version == bundle_version,
            bucket.bucket_start >= start,
            bucket.bucket_start < end,
            bucket.labelled_count > 0,
        )
        .group_by(bucket.device_id)
    )
    if devices is not None:
        query = query.where(bucket.device_id.in_(list(devices)))
    return {
        device_id: Labelled(int(count), int(correct), float(abs_sum or 0), float(sq_sum or 0))
        for device_id, count, correct, abs_sum, sq_sum in session.execute(query)
    }


def accuracy_upper_bound(correct: int, count: int, false_alarm: float) -> float:
    """The one-sided upper confidence bound (Wilson score, level 1 - `false_alarm`) of a
    share observed as `correct` of `count`: the true share is above it with probability
    at most `false_alarm`."""
    z = NormalDist().inv_cdf(1 - false_alarm)
    share = correct / count
    centre = share + z * z / (2 * count)
    spread = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count))
    return min(1.0, (centre + spread) / (1 + z * z / count))


def judge_accuracy(
    session: Session,
    settings: ServerSettings,
    end: dt.datetime,
    now: dt.datetime,
    opened: list[int],
    resolved: list[int],
) -> None:
    """One tick of accuracy-drop checks, for every bundle version with a reference figure
    and labelled feedback in the last `drift_window_max`: each device, and the cohorts the
    drift evaluator judges (`edgefleet.server.drift.cohorts`). Appends the ids of the
    alerts it opened and resolved."""
    versions = (
        select(TelemetryBucket.bundle_name, TelemetryBucket.bundle_version)
        .where(
            TelemetryBucket.bucket_start >= end - settings.drift_window_max,
            TelemetryBucket.bucket_start < end,
            TelemetryBucket.labelled_count > 0,
        )
        .distinct()
    )
    for name, version in sorted(session.execute(versions).all()):
        bundle = session.scalar(
            select(BundleRow).where(BundleRow.name == name, BundleRow.version == version)
        )
        reference = None if bundle is None else reference_accuracy(bundle)
        if bundle is not None and reference is not None:
            _VersionAccuracy(session, settings, bundle, reference, end, now).run(opened, resolved)


@dataclass
class _VersionAccuracy:
    session: Session
    settings: ServerSettings
    bundle: BundleRow
    reference: ReferenceAccuracy
    end: dt.datetime
    now: dt.datetime

    def run(self, opened: list[int], resolved: list[int]) -> None:
        states = {
            (state.scope, state.subject): state
            for state in self.session.scalars(
                select(DriftState).where(
                    DriftState.bundle_name == self.bundle.name,
                    DriftState.bundle_version == self.bundle.version,
                    DriftState.kind == ACCURACY_DROP,
                )
            )
        }
        earliest = self.end - self.settings.drift_window_max
        labelled = set(self._labelled(earliest, None))
        for device_id in sorted(labelled):
            state = states.get((DEVICE, device_id))
            self._judge(DEVICE, device_id, [device_id], state, opened, resolved)
        members = version_members(
            self.session, self.bundle.name, self.bundle.version, earliest, self.end
        )
        cohorts = judged_cohorts(
            self.session, self.settings, self.bundle.name, self.bundle.version, members
        )
        for cohort, devices in cohorts.judged.items():
            if labelled.intersection(devices):
                state = states.get((COHORT, cohort))
                self._judge(COHORT, cohort, devices, state, opened, resolved)
        self._end_unjudged_cohorts(cohorts, states, resolved)

    def _labelled(self, start: dt.datetime, devices: list[str] | None) -> dict[str, Labelled]:
        return labelled_by_device(
            self.session, self.bundle.name, self.bundle.version, start, self.end, devices
        )

    def _end_unjudged_cohorts(
        self, cohorts: Cohorts, states: dict[tuple[str, str], DriftState], resolved: list[int]
    ) -> None:
        """Resolve the accuracy alerts of the version's cohorts not judged any more (as the
        drift evaluator does for its own) and forget their states."""
        ended = select(Alert).where(
            Alert.kind == ACCURACY_DROP,
            Alert.scope == COHORT,
            Alert.bundle_name == self.bundle.name,
            Alert.bundle_version == self.bundle.version,
            Alert.cohort.not_in(list(cohorts.judged)),
            Alert.resolved_at.is_(None),
        )
        for alert in self.session.scalars(ended):
            reason = cohorts.skipped.get(alert.cohort or "", "the cohort no longer exists")
            resolve_alert(self.session, alert, self.now, {"reason": reason})
            resolved.append(alert.id)
        for (scope, subject), state in states.items():
            if scope == COHORT and subject not in cohorts.judged:
                self.session.delete(state)

    def _window(self, devices: list[str]) -> tuple[dt.timedelta, Labelled, int]:
        """The narrowest window (drift_window, a bucket wider each time, up to
        drift_window_max) with at least accuracy_min_labels labelled answers from `devices`."""
        step = self.settings.telemetry_bucket
        width = max(self.settings.drift_window, step)
        while True:
            by_device = self._labelled(self.end - width, devices)
            total = sum(by_device.values(), Labelled())
            if total.count >= self.settings.accuracy_min_labels or (
                width + step > self.settings.drift_window_max
            ):
                return width, total, len(by_device)
            width += step

    def _judge(
        self,
        scope: str,
        subject: str,
        devices: list[str],
        state: DriftState | None,
        opened: list[int],
        resolved: list[int],
    ) -> None:
        """Judge the next window of `subject` (a device, or a cohort of `devices`) if due."""
        if state is not None and self.end < state.window_end + self.settings.drift_window:
            return  # the next window is not complete yet
        width, labelled, labelling = self._window(devices)
        if labelled.count < self.settings.accuracy_min_labels:
            return  # too few labels: no evidence either way
        dropped, evidence = self._verdict(labelled)
        evidence.update(
            window_start=format_time(self.end - width), window_end=format_time(self.end)
        )
        if scope == COHORT:
            evidence["devices"] = labelling
        if state is None:
            state = DriftState(
                scope=scope,
                subject=subject,
                bundle_name=self.bundle.name,
                bundle_version=self.bundle.version,
                kind=ACCURACY_DROP,
                feature="",
                persistence=dict(Persistence(self.settings.drift_persistence).to_json()),
            )
            self.session.add(state)
        persistence = Persistence.from_json(state.persistence)
        persistence.windows = self.settings.drift_persistence
        transition = persistence.update(dropped)
        state.persistence = dict(persistence.to_json())
        state.window_end = self.end
        state.statistic = evidence["observed"]
        state.threshold = evidence["threshold"]
        device_id = subject if scope == DEVICE else None
        if transition == "open":
            alert = Alert(
                kind=ACCURACY_DROP,
                scope=scope,
                device_id=device_id,
                cohort=None if scope == DEVICE else subject,
                bundle_name=self.bundle.name,
                bundle_version=self.bundle.version,
                feature=None,
                opened_at=self.now,
                evidence=evidence,
            )
            open_alert(self.session, alert)
            opened.append(alert.id)
        elif transition == "close":
            query = select(Alert).where(
                Alert.kind == ACCURACY_DROP,
                Alert.scope == scope,
                Alert.device_id == device_id if device_id else Alert.cohort == subject,
                Alert.bundle_name == self.bundle.name,
                Alert.bundle_version == self.bundle.version,
                Alert.resolved_at.is_(None),
            )
            for alert in self.session.scalars(query):
                resolve_alert(self.session, alert, self.now, evidence)
                resolved.append(alert.id)

    def _verdict(self, labelled: Labelled) -> tuple[bool, dict[str, Any]]:
        """Whether the window's figure dropped, and its evidence."""
        tolerance = self.settings.accuracy_drop_tolerance
        reference = self.reference
        evidence: dict[str, Any] = {
            "metric": reference.metric,
            "labelled": labelled.count,
            "reference": reference.value,
        }
        if reference.metric == "rmse":
            rmse = math.sqrt(labelled.squared_error / labelled.count)
            threshold = reference.value * (1 + tolerance)
            evidence.update(observed=rmse, threshold=threshold)
            return rmse > threshold, evidence
        threshold = reference.value - tolerance
        bound = accuracy_upper_bound(
            labelled.correct, labelled.count, self.settings.accuracy_false_alarm
        )
        evidence.update(
            correct=labelled.correct,
            observed=labelled.correct / labelled.count,
            threshold=threshold,
            bound=bound,
        )
        return bound < threshold, evidence


def _number(value: Any) -> float | None:
    """`value` as a float when it is a finite JSON number, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
