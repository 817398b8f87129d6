"""Drift alerts through the API, the CLI client and /metrics, on a real app and database.

The bundle is pushed over the API; the alerts come from the real evaluator on
buckets of shifted digits (`tests.server.driftdata`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, AuditEntry
from edgefleet.server.drift.cohorts import VERSION_COHORT, profile_cohort, tag_cohort
from edgefleet.server.drift.evaluator import DATASET_DRIFT, FEATURE_DRIFT, PREDICTION_DRIFT
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.conftest import PROFILE, KeySet
from tests.server.apiclient import Api, make_api, serve
from tests.server.driftdata import Fleet, alerts, digits, pooled_reference, write_bundle
from tests.server.rolloutsim import add_device


@pytest.fixture
def drifted(database: Database, tmp_path: Path, trust: TrustRoot, keyset: KeySet) -> Api:
    """An app whose device "shifted" drifted (its alerts and its cohorts' are open: the
    version, the profile, the tag line=1 the two devices share) and whose device "steady"
    did not."""
    api = make_api(database, tmp_path, trust)
    features = digits().features
    bundle = write_bundle(
        tmp_path,
        keyset,
        "1.0.0",
        features=features.model_dump_json().encode(),
        reference=pooled_reference(features).model_dump_json().encode(),
    )
    assert api.push(bundle).status_code == 201
    for device_id in ("steady", "shifted"):
        add_device(database, device_id, model=("demo", "1.0.0"), tags={"line": "1"})
    fleet = Fleet(database, tmp_path, "1.0.0")
    for _ in range(4):
        fleet.send("steady", drifted=False)
        fleet.send("shifted", drifted=True)
        fleet.tick()
    assert alerts(database), "the shifted device's alerts are open"
    api.clock.now = fleet.clock.now
    return api


def test_list_alerts_filters_by_device_and_state(drifted: Api) -> None:
    listed = drifted.get("/alerts", Role.VIEWER)
    assert listed.status_code == 200, listed.text
    rows = listed.json()
    assert {row["device_id"] for row in rows} == {"shifted", None}
    assert {row["kind"] for row in rows} == {FEATURE_DRIFT, DATASET_DRIFT, PREDICTION_DRIFT}
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)
    pixel = next(row for row in rows if row["kind"] == FEATURE_DRIFT)
    assert set(pixel["evidence"]) >= {
        "statistic",
        "threshold",
        "samples",
        "psi",
        "js",
        "window_start",
        "window_end",
    }
    device_only = drifted.get("/alerts", Role.VIEWER, params={"device": "shifted"}).json()
    assert device_only and all(row["scope"] == "device" for row in device_only)
    assert drifted.get("/alerts", Role.VIEWER, params={"device": "steady"}).json() == []
    assert len(drifted.get("/alerts", Role.VIEWER, params={"limit": 2}).json()) == 2

    with drifted.context.db.session() as session:
        first = session.get(Alert, rows[-1]["id"])
        assert first is not None
        first.resolved_at = drifted.clock.now
    still_open = drifted.get("/alerts", Role.VIEWER, params={"open": "true"}).json()
    assert {row["id"] for row in still_open} == {row["id"] for row in rows} - {rows[-1]["id"]}


def test_list_alerts_filters_by_cohort_bundle_version_and_kind(drifted: Api) -> None:
    def listed(**params: str) -> list[dict[str, object]]:
        response = drifted.get("/alerts", Role.VIEWER, params=params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, object]] = response.json()
        return rows

    every = listed()
    assert {row["cohort"] for row in every} == {
        None,  # the device's
        VERSION_COHORT,
        profile_cohort(PROFILE),
        tag_cohort("line", "1"),
    }
    assert all((row["cohort"] is None) == (row["scope"] == "device") for row in every)
    tagged = listed(cohort=tag_cohort("line", "1"))
    assert tagged and {row["cohort"] for row in tagged} == {tag_cohort("line", "1")}
    assert listed(cohort="tag:line") == []  # exact, not a prefix
    datasets = listed(kind=DATASET_DRIFT)
    assert len(datasets) == 4 and {row["kind"] for row in datasets} == {DATASET_DRIFT}
    assert len(listed(bundle="demo", version="1.0.0")) == len(every)
    assert listed(bundle="other") == [] and listed(version="2.0.0") == []
    too_long = drifted.get("/alerts", Role.VIEWER, params={"cohort": "x" * 257})
    assert too_long.status_code == 422


def test_ack_is_the_operators_and_audited_once(drifted: Api) -> None:
    alert_id = drifted.get("/alerts", Role.VIEWER).json()[0]["id"]
    assert drifted.post(f"/alerts/{alert_id}/ack", Role.VIEWER).status_code == 403
    acked = drifted.post(f"/alerts/{alert_id}/ack", Role.OPERATOR)
    assert acked.status_code == 200, acked.text
    body = acked.json()
    assert body["acknowledged_by"].startswith("operator-")
    assert body["resolved_at"] is None  # seen, still open
    again = drifted.post(f"/alerts/{alert_id}/ack", Role.ADMIN).json()
    assert again["acknowledged_by"] == body["acknowledged_by"]
    with drifted.context.db.session() as session:
        entries = list(session.scalars(select(AuditEntry).where(AuditEntry.action == "alert.ack")))
    assert [(e.target, e.actor) for e in entries] == [
        (f"alert {alert_id}", body["acknowledged_by"])
    ]
    missing = drifted.post("/alerts/999999/ack", Role.OPERATOR)
    assert missing.status_code == 404 and missing.json()["error"] == "not-found"


def test_metrics_show_open_alerts_and_cohort_statistics(drifted: Api) -> None:
    response = drifted.client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    open_alerts = drifted.get("/alerts", Role.VIEWER, params={"open": "true"}).json()
    for kind in (FEATURE_DRIFT, DATASET_DRIFT, PREDICTION_DRIFT):
        expected = sum(1 for row in open_alerts if row["kind"] == kind)
        assert samples[("edgefleet_open_alerts", (("kind", kind),))] == expected
    statistics = {
        dict(labels)["feature"]: value
        for (name, labels), value in samples.items()
        if name == "edgefleet_feature_drift_statistic"
    }
    features = digits().features
    assert set(statistics) == {f.name for f in [*features.inputs, *features.outputs]}
    cohort_pixel = next(
        row
        for row in open_alerts
        if row["cohort"] == VERSION_COHORT and row["kind"] == FEATURE_DRIFT
    )
    assert statistics[cohort_pixel["feature"]] == pytest.approx(
        cohort_pixel["evidence"]["statistic"]
    )
    bundles = {
        dict(labels)["bundle"]
        for (name, labels), _ in samples.items()
        if name == "edgefleet_feature_drift_statistic"
    }
    assert bundles == {"demo@1.0.0"}


@pytest.fixture
def served(drifted: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with serve(drifted) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", drifted.tokens[Role.OPERATOR])
        yield drifted


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def test_cli_lists_and_acknowledges(served: Api, run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = run("alerts", "list", "--device", "shifted")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "DEVICE", "COHORT"]
    assert all(line.split()[2:4] == ["shifted", "-"] for line in lines[1:])
    pixel_line = next(line for line in lines if FEATURE_DRIFT in line)
    assert " > " in pixel_line and "samples (PSI " in pixel_line
    out, _ = run("alerts", "list", "--open", "--json")
    rows = json.loads(out)
    assert rows and all(row["resolved_at"] is None for row in rows)
    alert_id = rows[0]["id"]
    out, _ = run("alerts", "ack", str(alert_id))
    assert out.startswith(f"alert {alert_id} acknowledged by operator-")
    _, err = run("alerts", "ack", "999999", status=1)
    assert err.startswith("refused [not-found]: no alert 999999")
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.VIEWER])
    _, err = run("alerts", "ack", str(alert_id), status=1)
    assert err.startswith("refused [forbidden]: ")
    out, _ = run("alerts", "list", "--device", "steady")
    assert out.strip() == "no alerts"
    out, _ = run("alerts", "list", "--cohort", "tag:line=1", "--kind", DATASET_DRIFT)
    rows = out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].split()[1:4] == [DATASET_DRIFT, "-", "tag:line=1"]
