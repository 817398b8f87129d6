"""What the device page shows, read from the database: its model's figures per version,
its drift checks, its install history in words.

Reads only, each query bounded by the device and a time window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import BundleRow, Device, DriftState, TelemetryBucket
from edgefleet.server.drift.accuracy import Labelled, ReferenceAccuracy, reference_accuracy
from edgefleet.server.rollouts.latency import latency_percentile, merge_latency

# What an install state means, for the install history (agent/install/states.py names them).
INSTALL_STATE_WORDS = {
    "idle": "nothing installed yet",
    "downloading": "downloading the bundle",
    "verifying": "verifying signatures and files",
    "checking": "checking runtime, disk and memory",
    "staging": "unpacking the bundle",
    "smoke_testing": "running the bundle's sample inputs",
    "activating": "switching to the new version",
    "health_checking": "judging live requests on the new version",
    "shadowing": "starting the version in shadow",
    "committed": "installed and serving",
    "rolling_back": "rolling back to the previous version",
    "failed": "install failed",
    "refused": "refused the bundle",
    "rolled_back": "rolled back to the previous version",
}


def install_state_words(state: str) -> str:
    """An install state in words (the state itself when it is not a known one)."""
    return INSTALL_STATE_WORDS.get(state, state.replace("_", " "))


@dataclass(frozen=True)
class VersionFigures:
    """One bundle version's telemetry on one device over a period."""

    version: str
    role: str  # "in service", "previous" or "other"
    windows: int
    requests: int
    errors: int
    fallbacks: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    shadow_requests: int
    shadow_agreements: int
    labelled: Labelled
    reference: ReferenceAccuracy | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.requests if self.requests else None

    @property
    def shadow_agreement(self) -> float | None:
        return self.shadow_agreements / self.shadow_requests if self.shadow_requests else None


def version_figures(session: Session, device: Device, since: dt.datetime) -> list[VersionFigures]:
    """The device's figures per version of its model since `since`: the version in
    service first, then the previous one, then any other."""
    if device.model_name is None:
        return []
    bucket = TelemetryBucket
    mine = (
        bucket.device_id == device.id,
        bucket.bundle_name == device.model_name,
        bucket.bucket_start >= since,
    )
    sums = session.execute(
        select(
            bucket.bundle_version,
            func.sum(bucket.windows),
            func.sum(bucket.requests),
            func.sum(bucket.errors),
            func.sum(bucket.fallbacks),
            func.sum(bucket.shadow_requests),
            func.sum(bucket.shadow_agreements),
            func.sum(bucket.labelled_count),
            func.sum(bucket.labelled_correct),
            func.sum(bucket.labelled_abs_error),
            func.sum(bucket.labelled_squared_error),
        )
        .where(*mine)
        .group_by(bucket.bundle_version)
    ).all()
    latencies: dict[str, list[dict[str, Any] | None]] = {}
    for version, latency in session.execute(
        select(bucket.bundle_version, bucket.latency).where(*mine)
    ):
        latencies.setdefault(version, []).append(latency)
    bundles = {
        row.version: row
        for row in session.scalars(
            select(BundleRow).where(
                BundleRow.name == device.model_name,
                BundleRow.version.in_([row[0] for row in sums]),
            )
        )
    }
    out = []
    for version, windows, requests, errors, fallbacks, sh_req, sh_agree, *labels in sums:
        histogram = merge_latency(latencies.get(version, []))
        bundle = bundles.get(version)
        out.append(
            VersionFigures(
                version=version,
                role=_role(device, version),
                windows=int(windows or 0),
                requests=int(requests or 0),
                errors=int(errors or 0),
                fallbacks=int(fallbacks or 0),
                latency_p50_ms=latency_percentile(histogram, 0.5),
                latency_p95_ms=latency_percentile(histogram, 0.95),
                shadow_requests=int(sh_req or 0),
                shadow_agreements=int(sh_agree or 0),
                labelled=Labelled(
                    int(labels[0] or 0),
                    int(labels[1] or 0),
                    float(labels[2] or 0),
                    float(labels[3] or 0),
                ),
                reference=None if bundle is None else reference_accuracy(bundle),
            )
        )
    order = {"in service": 0, "previous": 1, "other": 2}
    return sorted(out, key=lambda figures: (order[figures.role], figures.version))


def _role(device: Device, version: str) -> str:
    if version == device.model_version:
        return "in service"
    if version == device.previous_version:
        return "previous"
    return "other"


@dataclass(frozen=True)
class DriftCheck:
    """The drift evaluator's latest judgement of one feature of the version in service."""

    kind: str
    feature: str  # "" for dataset drift
    statistic: float | None
    threshold: float | None
    window_end: dt.datetime
    drifted: bool | None  # None: judged before the server kept the verdict

    @property
    def verdict(self) -> str:
        """ "drift", "ok", or "not judged" (no statistic: too few samples, dataset drift)."""
        if self.statistic is None or self.threshold is None:
            return "not judged"
        drifted = self.statistic > self.threshold if self.drifted is None else self.drifted
        return "drift" if drifted else "ok"


def drift_checks(session: Session, device: Device) -> list[DriftCheck]:
    """The device's drift checks of the version in service, drifting features first."""
    if device.model_name is None or device.model_version is None:
        return []
    rows = session.scalars(
        select(DriftState).where(
            DriftState.scope == "device",
            DriftState.subject == device.id,
            DriftState.bundle_name == device.model_name,
            DriftState.bundle_version == device.model_version,
        )
    )
    checks = [
        DriftCheck(row.kind, row.feature, row.statistic, row.threshold, row.window_end, row.drifted)
        for row in rows
    ]
    order = {"drift": 0, "ok": 1, "not judged": 2}
    return sorted(checks, key=lambda check: (order[check.verdict], check.kind, check.feature))


__all__ = [
    "DriftCheck",
    "VersionFigures",
    "drift_checks",
    "install_state_words",
    "version_figures",
]
