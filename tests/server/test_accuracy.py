"""Accuracy from labelled feedback: the wire, the buckets, the report kept at push, the
reference figure, and accuracy-drop alerts on real databases."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.bundle import build_bundle
from edgefleet.bundlefiles import REPORT_FILE
from edgefleet.mqtt.messages import TelemetryWindow, encode_message, parse_message
from edgefleet.server.bundles import BundleStore
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, DriftState, TelemetryBucket
from edgefleet.server.drift.accuracy import (
    ACCURACY_DROP,
    ReferenceAccuracy,
    accuracy_upper_bound,
    reference_accuracy,
)
from edgefleet.server.drift.cohorts import VERSION_COHORT, profile_cohort, tag_cohort
from edgefleet.server.drift.evaluator import DriftEvaluator
from edgefleet.server.mqtt.aggregate import TelemetryAggregate
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import prepare_bundles
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.driftdata import START, alerts, push
from tests.server.rolloutsim import ManualClock, add_device, make_settings

BUCKET = dt.timedelta(minutes=5)


def converter_report(accuracy: float) -> dict[str, Any]:
    """The part of the converter's report.json (edgefleet.converter.report) that is read."""
    return {
        "schema_version": 1,
        "model": "demo.onnx",
        "kind": "classifier",
        "chosen": "int8-static",
        "candidates": [
            {"name": "float", "metrics": {"accuracy": 97.0}, "verdict": "baseline"},
            {"name": "int8-static", "metrics": {"accuracy": accuracy}, "verdict": "accepted"},
        ],
    }


REPORT_95 = json.dumps(converter_report(95.0)).encode()


def bundle_with_report(tmp_path: Path, keyset: KeySet, report: bytes) -> Path:
    src = write_model_dir(tmp_path / "src")
    (src / REPORT_FILE).write_bytes(report)
    output = tmp_path / "demo-1.0.0.efb"
    build_bundle(
        src, output, name="demo", version="1.0.0", keys=[keyset.release], profiles=[PROFILE]
    )
    return output


@pytest.fixture
def store(tmp_path: Path, trust: TrustRoot) -> BundleStore:
    return BundleStore(tmp_path / "data", trust, lambda: START)


def test_regression_feedback_travels_in_the_window_and_is_summed() -> None:
    recorder = TelemetryRecorder("cam-1", None, 60, bundle_name="demo", bundle_version="1.0.0")
    for error in (0.5, -1.5, 2.0):
        recorder.record_label(error=error)
    window = recorder.close_window(START + dt.timedelta(minutes=1))
    assert window is not None
    received = parse_message(TelemetryWindow, encode_message(window))
    aggregate = TelemetryAggregate()
    aggregate.add_window(received)
    aggregate.add_window(received)
    assert aggregate.labelled_count == 6 and aggregate.labelled_correct == 0
    assert aggregate.labelled_abs_error == pytest.approx(2 * 4.0)
    assert aggregate.labelled_squared_error == pytest.approx(2 * (0.25 + 2.25 + 4.0))


def test_a_window_without_regression_feedback_keeps_the_shape_older_servers_accept() -> None:
    recorder = TelemetryRecorder("cam-1", None, 60, bundle_name="demo", bundle_version="1.0.0")
    recorder.record_label(correct=True)
    recorder.record_label(correct=False)
    window = recorder.close_window(START + dt.timedelta(minutes=1))
    assert window is not None
    sent = json.loads(encode_message(window))
    assert sent["labelled"] == {"count": 2, "correct": 1}
    assert "shadow" not in sent  # absent, not null


def test_report_is_kept_at_push_and_gives_the_reference(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    push(
        database,
        store,
        bundle_with_report(tmp_path, keyset, REPORT_95),
    )
    with database.session() as session:
        row = session.scalars(select(BundleRow)).one()
        assert row.report == converter_report(95.0)
        assert reference_accuracy(row) == ReferenceAccuracy("accuracy", 0.95)


def test_an_unreadable_report_is_left_out_and_the_push_goes_on(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    push(database, store, bundle_with_report(tmp_path, keyset, b"[1, 2"))
    with database.session() as session:
        row = session.scalars(select(BundleRow)).one()
        assert row.report is None and reference_accuracy(row) is None


def test_reference_reads_rmse_and_ignores_reports_without_a_figure() -> None:
    report = converter_report(95.0)
    report["candidates"][1]["metrics"] = {"rmse": 0.25}
    assert reference_accuracy(BundleRow(report=report)) == ReferenceAccuracy("rmse", 0.25)
    report["candidates"][1]["metrics"] = {"cosine": 0.999}
    assert reference_accuracy(BundleRow(report=report)) is None
    assert reference_accuracy(BundleRow(report=None)) is None


def test_upper_bound_is_above_the_observed_share_and_tightens_with_more_labels() -> None:
    few, many = accuracy_upper_bound(30, 50, 0.01), accuracy_upper_bound(600, 1000, 0.01)
    assert 0.6 < many < few < 0.9


def add_labels(db: Database, device_id: str, start: dt.datetime, count: int, correct: int) -> None:
    zero = ("requests", "errors", "fallbacks", "schema_violations", "dropped_windows")
    values = dict.fromkeys((*zero, "shadow_requests", "shadow_agreements"), 0)
    with db.session() as session:
        session.add(
            TelemetryBucket(
                device_id=device_id,
                bundle_name="demo",
                bundle_version="1.0.0",
                bucket_start=start,
                windows=1,
                labelled_count=count,
                labelled_correct=correct,
                latency={},
                bins={},
                **values,
            )
        )


def test_accuracy_drop_opens_for_the_device_below_the_reference_only(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    push(
        database,
        store,
        bundle_with_report(tmp_path, keyset, REPORT_95),
    )
    for device_id in ("poor", "fine", "quiet"):
        add_device(database, device_id, model=("demo", "1.0.0"))
    clock = ManualClock(START)
    evaluator = DriftEvaluator(database, make_settings(tmp_path), clock)
    bucket, opened = START, []
    for _ in range(6):  # two windows of 15 minutes
        add_labels(database, "poor", bucket, 40, 24)  # 60% against 95%
        add_labels(database, "fine", bucket, 50, 47)  # 94%: within the tolerance
        add_labels(database, "quiet", bucket, 2, 0)  # far too few labels to judge
        bucket += BUCKET
        clock.now = bucket + dt.timedelta(seconds=1)
        opened += evaluator.tick().opened
    found = [a for a in alerts(database) if a.kind == ACCURACY_DROP]
    assert sorted(a.id for a in found) == sorted(opened)
    assert {(a.scope, a.device_id, a.cohort) for a in found} == {
        ("device", "poor", None),
        ("cohort", None, VERSION_COHORT),
        ("cohort", None, profile_cohort(PROFILE)),  # the three devices share the profile
    }
    device = next(a for a in found if a.device_id == "poor")
    evidence = device.evidence
    assert evidence["labelled"] == 120 and evidence["correct"] == 72
    assert evidence["observed"] == pytest.approx(0.6)
    assert evidence["reference"] == pytest.approx(0.95)
    assert evidence["bound"] < evidence["threshold"] == pytest.approx(0.90)
    with database.session() as session:
        subjects = {
            s.subject
            for s in session.scalars(select(DriftState).where(DriftState.kind == ACCURACY_DROP))
        }
    assert "quiet" not in subjects and {"poor", "fine"} <= subjects


def test_accuracy_drop_is_judged_per_tag_cohort_with_the_drift_evaluators_rules(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    push(database, store, bundle_with_report(tmp_path, keyset, REPORT_95))
    lines = {"poor-a": "2", "poor-b": "2", "fine-a": "1", "fine-b": "1", "fine-c": "1"}
    for device_id, line in lines.items():
        add_device(
            database, device_id, model=("demo", "1.0.0"), tags={"line": line, "id": device_id}
        )
    clock = ManualClock(START)
    settings = make_settings(tmp_path, accuracy_min_labels=150)
    evaluator = DriftEvaluator(database, settings, clock)
    bucket = START
    for _ in range(9):
        for device_id in lines:
            # 15 labels a bucket: a device alone has too few in an hour, two devices enough
            add_labels(database, device_id, bucket, 15, 9 if device_id.startswith("poor") else 14)
        bucket += BUCKET
        clock.now = bucket + dt.timedelta(seconds=1)
        evaluator.tick()
    cohorts = {a.cohort for a in alerts(database) if a.kind == ACCURACY_DROP}
    # line=2 is all poor (60%); the version (80%) is below 90% too; line=1 (93%) is not;
    # tag cohorts of one device ("id:...") are below the minimum size and not judged
    assert cohorts == {tag_cohort("line", "2"), VERSION_COHORT, profile_cohort(PROFILE)}
    with database.session() as session:
        subjects = {
            s.subject
            for s in session.scalars(select(DriftState).where(DriftState.kind == ACCURACY_DROP))
        }
    assert tag_cohort("line", "1") in subjects
    assert not any(subject.startswith("tag:id=") for subject in subjects)
    assert not set(lines) & subjects  # 135 labels in the widest window: too few per device

    with database.session() as session:  # poor-b leaves line 2: a cohort of one device
        device = session.get(Device, "poor-b")
        assert device is not None
        device.tags = {"id": "poor-b"}
    clock.now += BUCKET
    report = evaluator.tick()
    line_2 = next(a for a in alerts(database) if a.cohort == tag_cohort("line", "2"))
    assert line_2.id in report.resolved and line_2.resolved_at == clock.now
    assert line_2.evidence["resolved_by"] == {"reason": "fewer than 2 devices"}
    with database.session() as session:
        states = session.scalars(select(DriftState).where(DriftState.kind == ACCURACY_DROP))
        assert tag_cohort("line", "2") not in {state.subject for state in states}


def test_reference_is_the_shipped_candidates_accuracy_in_a_real_converter_report(
    database: Database,
    store: BundleStore,
    tmp_path_factory: pytest.TempPathFactory,
    keyset: KeySet,
) -> None:
    bundles = prepare_bundles(tmp_path_factory.mktemp("accuracy-bundles"), keyset.release)
    report = json.loads((bundles.model_dir / REPORT_FILE).read_text())
    shipped = next(row for row in report["candidates"] if row["name"] == report["chosen"])
    percent = shipped["metrics"]["accuracy"]
    assert 50 < percent <= 100  # the digits MLP, measured on labelled validation digits
    push(database, store, bundles.releases[0])
    with database.session() as session:
        row = session.scalars(select(BundleRow)).one()
        assert reference_accuracy(row) == ReferenceAccuracy("accuracy", percent / 100)
