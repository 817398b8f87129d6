"""Drift test data: a reference from scikit-learn's digits, bundles carrying it, bucket rows.

The reference is computed as the converter computes it (quantile bins, counts,
thresholds calibrated by resampling) on half of the digits; the other half is
the live data devices "see", as is (no drift) or shifted.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sqlalchemy import select

from edgefleet.bundle import build_bundle
from edgefleet.converter.driftcal import calibrate
from edgefleet.drift import (
    REFERENCE_FILE,
    DriftReference,
    FeatureReference,
    count_into,
    quantile_edges,
)
from edgefleet.driftfeatures import (
    FEATURES_FILE,
    DriftFeature,
    DriftFeatures,
    LenientThresholds,
    TensorLayout,
    class_edges,
)
from edgefleet.server.bundles import BundleStore
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, TelemetryBucket
from edgefleet.server.drift.evaluator import DriftEvaluator, TickReport
from edgefleet.server.mqtt.aggregate import Bins
from edgefleet.server.principals import Principal, Role
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.rolloutsim import ManualClock, make_settings

PIXELS = (19, 20, 26, 36, 43, 53)  # pixel columns of the 8x8 digits that vary
CLASSES = 10
WINDOWS = (50, 200, 800)
FALSE_ALARM = 0.01
BUCKET = dt.timedelta(minutes=5)
START = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)  # a bucket boundary


@dataclass(frozen=True)
class Digits:
    features: DriftFeatures
    live: np.ndarray  # held-out samples x 64 pixels
    labels: np.ndarray  # their classes (the "predictions" devices report)
    everything: np.ndarray  # the reference's samples and the held-out ones
    every_label: np.ndarray


@functools.cache
def digits() -> Digits:
    """The reference of half the digits (fixed seed), and the other half as live data."""
    data = load_digits()
    order = np.random.default_rng(7).permutation(len(data.target))
    half = len(order) // 2
    reference, live = data.data[order[:half]], data.data[order[half:]]
    reference_labels, live_labels = data.target[order[:half]], data.target[order[half:]]
    rng = np.random.default_rng(11)
    inputs = []
    for column in PIXELS:
        values = reference[:, column]
        edges = quantile_edges(values)
        inputs.append(_feature(f"pixels[{column}]", "pixels", column, "value", values, edges, rng))
    outputs = [
        _feature("scores.top1", "scores", None, "top1", reference_labels, class_edges(CLASSES), rng)
    ]
    features = DriftFeatures(
        samples=half,
        tensors=[
            TensorLayout(tensor="pixels", batched=True, rank=1, axis=0, width=64),
            TensorLayout(tensor="scores", batched=True, rank=1, axis=0, width=CLASSES),
        ],
        inputs=inputs,
        outputs=outputs,
    )
    return Digits(features, live, live_labels, data.data[order], data.target[order])


def _feature(
    name: str,
    tensor: str,
    index: int | None,
    summary: str,
    values: np.ndarray,
    edges: list[float],
    rng: np.random.Generator,
) -> DriftFeature:
    thresholds = calibrate(
        [np.array([value], dtype=np.float64) for value in values],
        edges,
        WINDOWS,
        [FALSE_ALARM],
        rng,
    )
    return DriftFeature(
        name=name,
        tensor=tensor,
        index=index,
        histogram=count_into(values.astype(np.float64), edges),
        summary=summary,
        thresholds=LenientThresholds.model_validate(thresholds.model_dump()),
    )


def pooled_reference(features: DriftFeatures) -> DriftReference:
    """The drift-reference.json of the same features: counts, no thresholds."""

    def pooled(feature: DriftFeature) -> FeatureReference:
        return FeatureReference(
            name=feature.name,
            tensor=feature.tensor,
            index=feature.index,
            histogram=feature.histogram,
        )

    return DriftReference(
        samples=features.samples,
        feature_axes={"pixels": 0, "scores": None},
        inputs=[pooled(f) for f in features.inputs],
        outputs=[pooled(f) for f in features.outputs],
    )


def write_bundle(
    directory: Path,
    keyset: KeySet,
    version: str,
    *,
    features: bytes | None = None,
    reference: bytes | None = None,
) -> Path:
    """A signed bundle demo@`version` carrying the given reference files."""
    src = write_model_dir(directory / f"src-{version}")
    if features is not None:
        (src / FEATURES_FILE).write_bytes(features)
    if reference is not None:
        (src / REFERENCE_FILE).write_bytes(reference)
    output = directory / f"demo-{version}.efb"
    build_bundle(
        src, output, name="demo", version=version, keys=[keyset.release], profiles=[PROFILE]
    )
    return output


def window_bins(
    features: DriftFeatures, pixels: np.ndarray, labels: np.ndarray, *, shift: float = 0.0
) -> Bins:
    """What devices send for these samples, as a telemetry bucket stores it."""

    def counted(feature: DriftFeature, values: np.ndarray) -> dict[str, object]:
        histogram = count_into(values.astype(np.float64), feature.histogram.edges)
        return {
            "counts": histogram.counts,
            "nan": histogram.nan,
            "below": histogram.below,
            "above": histogram.above,
        }

    inputs = {f.name: counted(f, pixels[:, f.index] + shift) for f in features.inputs}
    outputs = {f.name: counted(f, labels) for f in features.outputs}
    return {"inputs": inputs, "outputs": outputs}


def add_bucket(db: Database, device_id: str, version: str, start: dt.datetime, bins: Bins) -> None:
    """One stored telemetry bucket of `device_id` serving demo@`version`."""
    with db.session() as session:
        session.add(
            TelemetryBucket(
                device_id=device_id,
                bundle_name="demo",
                bundle_version=version,
                bucket_start=start,
                windows=1,
                requests=1,
                errors=0,
                fallbacks=0,
                schema_violations=0,
                dropped_windows=0,
                shadow_requests=0,
                shadow_agreements=0,
                labelled_count=0,
                labelled_correct=0,
                latency={},
                bins=bins,
            )
        )


SAMPLES_PER_BUCKET = 100
PUSHER = Principal("ci", Role.OPERATOR)


def push(db: Database, store: BundleStore, bundle: Path) -> None:
    """Push `bundle` into `store` as the API does."""
    upload = store.new_upload_path()
    upload.write_bytes(bundle.read_bytes())
    with db.session() as session:
        store.push(session, upload, PUSHER)


class Fleet:
    """Devices on demo@`version` sending a bucket of digits each; `tick` closes the bucket
    and runs the evaluator. Drifted samples are held-out digits of classes 0-4 only, every
    pixel +3. Calm samples are drawn from every digit, the reference's too: a cohort's window of
    thousands of samples drawn from the 899 held-out digits alone would carry their own chance
    difference from the reference, twice over, as if it were drift."""

    def __init__(self, db: Database, tmp_path: Path, version: str, **settings: object) -> None:
        self.db = db
        self.version = version
        self.clock = ManualClock(START)
        self.settings = make_settings(tmp_path, **settings)
        self.evaluator = DriftEvaluator(db, self.settings, self.clock)
        self.rng = np.random.default_rng(3)
        self.bucket = START

    def send(self, device_id: str, *, drifted: bool, samples: int = SAMPLES_PER_BUCKET) -> None:
        data = digits()
        if drifted:
            rows = self.rng.choice(np.flatnonzero(data.labels < 5), size=samples)
            bins = window_bins(data.features, data.live[rows], data.labels[rows], shift=3.0)
        else:
            rows = self.rng.choice(len(data.every_label), size=samples)
            bins = window_bins(data.features, data.everything[rows], data.every_label[rows])
        add_bucket(self.db, device_id, self.version, self.bucket, bins)

    def tick(self) -> TickReport:
        """Close the current bucket and run the evaluator."""
        self.bucket += BUCKET
        self.clock.now = self.bucket + dt.timedelta(seconds=1)
        return self.evaluator.tick()


def alerts(db: Database) -> list[Alert]:
    """Every alert, oldest first."""
    with db.session() as session:
        return list(session.scalars(select(Alert).order_by(Alert.id)))
