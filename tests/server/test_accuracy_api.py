"""Labelled accuracy shown: GET /api/v1/accuracy per version, device, tag and profile,
`edgefleet bundles show` and `edgefleet devices show` against the real app served by
uvicorn, and the Prometheus gauge."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.bundle import build_bundle
from edgefleet.bundlefiles import REPORT_FILE
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import TelemetryBucket
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.apiclient import Api, make_api, serve
from tests.server.driftdata import START
from tests.server.rolloutsim import add_device
from tests.server.test_accuracy import converter_report

BUCKET = dt.timedelta(minutes=5)
OTHER_PROFILE = "armv8-cpu"


def write_bundle(tmp_path: Path, keyset: KeySet, version: str, report: dict[str, Any]) -> Path:
    src = write_model_dir(tmp_path / f"src-{version}")
    (src / REPORT_FILE).write_text(json.dumps(report))
    output = tmp_path / f"demo-{version}.efb"
    build_bundle(
        src, output, name="demo", version=version, keys=[keyset.release], profiles=[PROFILE]
    )
    return output


def add_feedback(
    db: Database,
    device_id: str,
    version: str,
    start: dt.datetime,
    count: int,
    correct: int = 0,
    abs_error: float = 0.0,
    squared_error: float = 0.0,
) -> None:
    """A telemetry bucket whose only content is labelled feedback."""
    zero = ("requests", "errors", "fallbacks", "schema_violations", "dropped_windows")
    with db.session() as session:
        session.add(
            TelemetryBucket(
                device_id=device_id,
                bundle_name="demo",
                bundle_version=version,
                bucket_start=start,
                windows=1,
                labelled_count=count,
                labelled_correct=correct,
                labelled_abs_error=abs_error,
                labelled_squared_error=squared_error,
                latency={},
                bins={},
                **dict.fromkeys((*zero, "shadow_requests", "shadow_agreements"), 0),
            )
        )


@pytest.fixture
def labelled(database: Database, tmp_path: Path, trust: TrustRoot, keyset: KeySet) -> Api:
    """demo@1.0.0 (a classifier, reference 95%) with class labels from three devices over
    two buckets, a fourth device without labels, and demo@2.0.0 (a regressor, reference
    rmse 0.5) with regression feedback from one device."""
    api = make_api(database, tmp_path, trust)
    regressor = converter_report(95.0)
    regressor["candidates"][1]["metrics"] = {"rmse": 0.5}
    for version, report in (("1.0.0", converter_report(95.0)), ("2.0.0", regressor)):
        response = api.push(write_bundle(tmp_path, keyset, version, report))
        assert response.status_code == 201, response.text
    add_device(database, "a-1", tags={"line": "1"})
    add_device(database, "a-2", tags={"line": "1"})
    add_device(database, "b-1", tags={"line": "2"}, profile=OTHER_PROFILE)
    add_device(database, "quiet", tags={"line": "1"})
    add_device(database, "reg-1", model=("demo", "2.0.0"))
    for start in (START, START + BUCKET):
        add_feedback(database, "a-1", "1.0.0", start, 10, 9)
        add_feedback(database, "a-2", "1.0.0", start, 20, 14)
        add_feedback(database, "b-1", "1.0.0", start, 5, 1)
    # errors 1, -2, 2 then 0.5, -0.5: |e| sums 5 and 1, e^2 sums 9 and 0.5
    add_feedback(database, "reg-1", "2.0.0", START, 3, abs_error=5.0, squared_error=9.0)
    add_feedback(database, "reg-1", "2.0.0", START + BUCKET, 2, abs_error=1.0, squared_error=0.5)
    api.clock.now = START + dt.timedelta(minutes=30)
    return api


def accuracy(api: Api, **params: str) -> dict[str, Any]:
    response = api.get("/accuracy", Role.VIEWER, params={"bundle": "demo", **params})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def by_subject(answer: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {row["device_id"]: row for row in answer["subjects"]}


def test_version_figures_sum_every_device_and_name_the_reference(labelled: Api) -> None:
    answer = accuracy(labelled, version="1.0.0")
    assert answer["cohort"] == "version"
    assert answer["reference_metric"] == "accuracy"
    assert answer["reference"] == pytest.approx(0.95)
    rows = by_subject(answer)
    assert list(rows) == [None, "a-1", "a-2", "b-1"]  # "quiet" sent no labels
    assert (rows[None]["labelled"], rows[None]["correct"]) == (70, 48)
    assert rows[None]["accuracy"] == pytest.approx(48 / 70)
    assert (rows["a-2"]["labelled"], rows["a-2"]["correct"]) == (40, 28)
    assert rows["a-2"]["accuracy"] == pytest.approx(0.7)
    assert rows["a-2"]["mae"] is None and rows["a-2"]["rmse"] is None


def test_device_figures_are_that_devices_only(labelled: Api) -> None:
    answer = accuracy(labelled, version="1.0.0", device="b-1")
    assert answer["cohort"] is None
    assert [(r["device_id"], r["labelled"], r["correct"]) for r in answer["subjects"]] == [
        ("b-1", 10, 2)
    ]
    assert answer["subjects"][0]["accuracy"] == pytest.approx(0.2)


def test_tag_and_profile_figures_are_their_cohorts(labelled: Api) -> None:
    answer = accuracy(labelled, version="1.0.0", tag="line=1")
    assert answer["cohort"] == "tag:line=1"
    rows = by_subject(answer)
    assert list(rows) == [None, "a-1", "a-2"]
    assert (rows[None]["labelled"], rows[None]["correct"]) == (60, 46)
    assert rows[None]["accuracy"] == pytest.approx(46 / 60)
    answer = accuracy(labelled, version="1.0.0", profile=OTHER_PROFILE)
    assert answer["cohort"] == f"profile:{OTHER_PROFILE}"
    assert [(r["device_id"], r["labelled"]) for r in answer["subjects"]] == [
        (None, 10),
        ("b-1", 10),
    ]
    answer = accuracy(labelled, version="1.0.0", tag="line=9")
    assert [(r["device_id"], r["labelled"], r["accuracy"]) for r in answer["subjects"]] == [
        (None, 0, None)
    ]


def test_regression_figures_are_mae_and_rmse_against_the_reference_rmse(labelled: Api) -> None:
    answer = accuracy(labelled, version="2.0.0")
    assert (answer["reference_metric"], answer["reference"]) == ("rmse", 0.5)
    version = by_subject(answer)[None]
    assert version["labelled"] == 5 and version["accuracy"] is None
    assert version["mae"] == pytest.approx(6.0 / 5)
    assert version["rmse"] == pytest.approx((9.5 / 5) ** 0.5)


def test_only_labels_of_the_time_range_count(labelled: Api) -> None:
    labelled.clock.now = START + dt.timedelta(hours=1, minutes=2)  # the first bucket is older
    answer = accuracy(labelled, version="1.0.0", hours="1")
    assert by_subject(answer)[None]["labelled"] == 35


def test_bad_filters_are_refused_in_one_answer(labelled: Api) -> None:
    for params, detail in (
        ({"tag": "line"}, "'line' is not tag=value"),
        ({"tag": "line=1,site=b"}, "is not one name=value"),
        ({"tag": "line=1", "profile": PROFILE}, "at most one of device, tag and profile"),
    ):
        response = labelled.get(
            "/accuracy", Role.VIEWER, params={"bundle": "demo", "version": "1.0.0", **params}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid-request"
        assert detail in response.json()["detail"]
    response = labelled.get("/accuracy", Role.VIEWER, params={"bundle": "demo", "version": "9.9.9"})
    assert response.status_code == 404


def test_metrics_show_each_versions_labelled_accuracy(labelled: Api) -> None:
    response = labelled.client.get("/metrics")
    assert response.status_code == 200
    gauges = {
        sample.labels["bundle"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "edgefleet_labelled_accuracy"
    }
    # the regressor has no accuracy to show; the classifier's is its labels' share
    assert gauges == {"demo@1.0.0": pytest.approx(48 / 70)}
    labelled.clock.now = START + dt.timedelta(hours=2)  # past drift_window_max
    response = labelled.client.get("/metrics")
    assert "edgefleet_labelled_accuracy{" not in response.text


@pytest.fixture
def served(labelled: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with serve(labelled) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", labelled.tokens[Role.VIEWER])
        yield labelled


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of the accuracy table in `out`, by their first cell."""
    lines = out.split("labelled feedback since ", 1)[1].splitlines()
    assert lines[1].split() == ["WHERE", "LABELLED", "CORRECT", "ACCURACY", "MAE", "RMSE"]
    rows = {}
    for line in lines[2:]:
        if line.startswith("every device"):
            rows["every device"] = line.removeprefix("every device").split()
        elif line.strip():
            first, *rest = line.split()
            rows[first] = rest
    return rows


def test_bundles_show_prints_the_accuracy_table_when_labels_exist(
    served: Api, run: Cli, database: Database
) -> None:
    out, _ = run("bundles", "show", "demo@1.0.0")
    assert "(reference accuracy: 95.0%):" in out
    rows = table_rows(out)
    assert rows["every device"] == ["70", "48", f"{100 * 48 / 70:.1f}%", "-", "-"]
    assert rows["a-2"] == ["40", "28", "70.0%", "-", "-"]
    assert "quiet" not in rows
    out, _ = run("bundles", "show", "demo@2.0.0")
    assert "(reference rmse: 0.5):" in out
    assert table_rows(out)["reg-1"] == ["5", "0", "-", "1.2", f"{(9.5 / 5) ** 0.5:.4g}"]


def test_devices_show_prints_the_devices_figures_and_nothing_without_labels(
    served: Api, run: Cli
) -> None:
    out, _ = run("devices", "show", "b-1")
    assert table_rows(out) == {"b-1": ["10", "2", "20.0%", "-", "-"]}
    out, _ = run("devices", "show", "quiet")
    assert "device:" in out and "labelled feedback" not in out


def test_bundles_show_prints_no_table_without_labels(
    served: Api, run: Cli, database: Database
) -> None:
    served.clock.now = START + dt.timedelta(days=2)  # every label is older than 24 hours
    out, _ = run("bundles", "show", "demo@1.0.0")
    assert "model.onnx" in out and "labelled feedback" not in out
