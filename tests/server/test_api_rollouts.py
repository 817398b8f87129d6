"""Rollouts through the API: start, read, pause, resume, abort, and what each refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api

PLAN = {"stages": [{"percent": 50}, {"percent": 100}]}


@pytest.fixture
def api(database: Database, tmp_path: Path, trust: TrustRoot, bundle_file: Path) -> Api:
    api = make_api(database, tmp_path, trust)
    assert api.push(bundle_file).status_code == 201
    for n in range(4):
        site = "berlin" if n < 3 else "paris"
        assert api.enroll(f"dev-{n}", tags={"site": site}).status_code == 201
    return api


def start(api: Api, **overrides: object) -> object:
    body = {"bundle": "demo@1.2.3", "select": "site=berlin", "plan": PLAN, **overrides}
    return api.post("/rollouts", Role.OPERATOR, json=body)


def test_start_read_pause_resume_abort_and_audit(api: Api) -> None:
    started = start(api)
    assert started.status_code == 201, started.text  # type: ignore[attr-defined]
    status = started.json()  # type: ignore[attr-defined]
    rid = status["id"]
    assert status["bundle"] == "demo@1.2.3" and status["state"] == "running"
    assert status["selector"] == {"site": "berlin"} and status["stage_count"] == 2
    assert status["stages"][0]["assigned"] == 2  # ceil(50% of 3)

    assert api.get(f"/rollouts/{rid}", Role.VIEWER).json()["id"] == rid
    listed = api.get("/rollouts", Role.VIEWER).json()
    assert [(r["id"], r["bundle"], r["state"], r["stage_count"]) for r in listed] == [
        (rid, "demo@1.2.3", "running", 2)
    ]
    assert api.get("/rollouts", params={"state": "paused"}).json() == []

    paused = api.post(f"/rollouts/{rid}/pause", Role.OPERATOR, json={"reason": "lunch"})
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert paused.json()["reason"] == "lunch"
    again = api.post(f"/rollouts/{rid}/pause", Role.OPERATOR)
    assert again.status_code == 409 and again.json()["error"] == "rollout-state"
    resumed = api.post(f"/rollouts/{rid}/resume", Role.OPERATOR)  # no body at all
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    aborted = api.post(f"/rollouts/{rid}/abort", Role.OPERATOR, json={})
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborting"
    assert api.post(f"/rollouts/{rid}/resume", Role.OPERATOR).status_code == 409

    transitions = [(t["from_state"], t["to_state"]) for t in aborted.json()["transitions"]]
    assert transitions[-3:] == [
        ("running", "paused"),
        ("paused", "running"),
        ("running", "aborting"),
    ]
    actions = [e["action"] for e in api.get("/audit").json() if e["action"].startswith("rollout")]
    assert actions == ["rollout.abort", "rollout.resume", "rollout.pause", "rollout.start"]
    assert api.publisher.calls == []  # the driver sends directives, never a request


@pytest.mark.parametrize(
    ("overrides", "status", "code", "word"),
    [
        ({"bundle": "demo@9.9.9"}, 404, "not-found", "9.9.9"),
        ({"bundle": "demo"}, 422, "invalid-request", "bundle"),
        ({"plan": {"stages": []}}, 422, "invalid-request", "stages"),
        ({"plan": {"stages": [{"percent": 150}]}}, 422, "invalid-request", "percent"),
        ({"plan": {"stages": [{"percent": 100}], "bogus": 1}}, 422, "invalid-request", "bogus"),
        ({"plan": "stages: []"}, 422, "invalid-request", "plan"),
        ({"select": "site=nowhere"}, 422, "invalid-request", ""),
        ({"select": "=,="}, 422, "invalid-request", ""),
        ({"extra": True}, 422, "invalid-request", "extra"),
    ],
)
def test_bad_starts_are_refused_naming_the_problem(
    api: Api, overrides: dict[str, object], status: int, code: str, word: str
) -> None:
    response = start(api, **overrides)
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["error"] == code and word in body["detail"]
    assert api.get("/rollouts").json() == []


def test_unknown_rollouts_are_404_and_bad_ids_422(api: Api) -> None:
    assert api.get("/rollouts/12345").status_code == 404
    assert api.post("/rollouts/12345/pause", Role.OPERATOR).status_code == 404
    assert api.get("/rollouts/0").status_code == 422
    assert api.get("/rollouts/abc").status_code == 422
    assert api.get("/rollouts/99999999999999999999999").status_code == 422
    assert api.get("/rollouts", params={"state": "sideways"}).status_code == 422
    long_reason = api.post("/rollouts/1/pause", Role.OPERATOR, json={"reason": "x" * 5000})
    assert long_reason.status_code == 422
    assert api.post("/rollouts/1/pause", Role.OPERATOR, json={"why": "x"}).status_code == 422


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ('{"stages": [{"percent": Infinity}]}', "stages.0.percent"),
        (
            '{"stages": [{"percent": 100}], "gates": {"max_latency_p95_ratio": Infinity}}',
            "gates.max_latency_p95_ratio",
        ),
        ('{"stages": [{"percent": 100, "gates": {"bake_s": NaN}}]}', "stages.0.gates.bake_s"),
    ],
)
def test_a_plan_with_numbers_that_are_not_finite_is_refused(
    api: Api, plan: str, field: str
) -> None:
    # Python's JSON parser, which the API's is, reads Infinity and NaN.
    body = '{"bundle": "demo@1.2.3", "select": "site=berlin", "plan": ' + plan + "}"
    response = api.post(
        "/rollouts", Role.OPERATOR, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "invalid-request",
        "detail": f"invalid plan: {field}: Input should be a finite number",
    }
    assert api.get("/rollouts").json() == []
