"""Devices through the API: enrollment (open, by token, closed), the inventory, one device,
removal."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, StatusReportRow, TelemetryBucket
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, enroll_body, make_api
from tests.server.test_devices import make_rollout


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(sqlite_database, tmp_path, trust)


class KeyCacheSpy:
    """Our `KeyCache` interface, recording invalidations."""

    def __init__(self) -> None:
        self.invalidated: list[str] = []

    def invalidate(self, device_id: str) -> None:
        self.invalidated.append(device_id)


def test_enroll_is_idempotent_for_the_same_key_and_tells_the_key_cache(api: Api) -> None:
    spy = KeyCacheSpy()
    api.context.device_keys = spy
    body = enroll_body("cam-1", tags={"site": "berlin"})
    first = api.post("/devices/enroll", None, json=body)
    assert first.status_code == 201, first.text
    assert first.json()["id"] == "cam-1" and first.json()["tags"] == {"site": "berlin"}
    again = api.post("/devices/enroll", None, json=body)
    assert again.status_code == 200
    assert spy.invalidated == ["cam-1", "cam-1"]
    rekey = api.enroll("cam-1")  # another key
    assert rekey.status_code == 403 and rekey.json()["error"] == "enrollment"
    assert "edgefleet devices remove cam-1" in rekey.json()["detail"]
    assert spy.invalidated == ["cam-1", "cam-1"]


def test_closed_enrollment_needs_a_one_time_token(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, open_enrollment=False)
    refused = api.enroll("cam-1")
    assert refused.status_code == 403 and refused.json()["error"] == "enrollment"
    created = api.post("/enroll-tokens", Role.OPERATOR, json={"tags": {"line": "3"}, "ttl_s": 60})
    assert created.status_code == 201, created.text
    token = created.json()
    assert token["tags"] == {"line": "3"} and token["token"].startswith("efe_")
    enrolled = api.enroll("cam-1", enroll_token=token["token"])
    assert enrolled.status_code == 201 and enrolled.json()["tags"] == {"line": "3"}
    reused = api.enroll("cam-2", enroll_token=token["token"])
    assert reused.status_code == 403 and "used" in reused.json()["detail"]
    assert api.enroll("cam-3", enroll_token="efe_" + "x" * 43).status_code == 403
    actions = [e["action"] for e in api.get("/audit").json()]
    assert "enroll-token.create" in actions and "device.enroll" in actions


def test_a_claim_enrolls_three_devices_and_refuses_a_fourth(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, open_enrollment=False)
    body = {"tags": {"image": "pi-v3"}, "ttl_s": 3600, "max_uses": 3}
    created = api.post("/enroll-tokens", Role.OPERATOR, json=body)
    assert created.status_code == 201 and created.json()["max_uses"] == 3
    claim = created.json()["token"]
    for device_id in ("cam-1", "cam-2", "cam-3"):
        enrolled = api.enroll(device_id, enroll_token=claim)
        assert enrolled.status_code == 201 and enrolled.json()["tags"] == {"image": "pi-v3"}
    fourth = api.enroll("cam-4", enroll_token=claim)
    assert fourth.status_code == 403, fourth.text
    assert "used by all the 3 devices" in fourth.json()["detail"]
    assert api.get("/devices").json()["total"] == 3


@pytest.mark.parametrize(
    "change",
    [
        {"device_id": "bad/id"},
        {"public_key": "00" * 31},
        {"agent_version": 1},
        {"tags": {"k": "v,w"}},
        {"runtimes": ["x"] * 17},
        {"admin": True},
    ],
)
def test_bad_enrollments_are_422(api: Api, change: dict[str, object]) -> None:
    response = api.post("/devices/enroll", None, json={**enroll_body("cam-9"), **change})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid-request"
    assert api.get("/devices").json()["total"] == 0


def test_enroll_token_requests_are_checked(api: Api) -> None:
    for body in (
        {"ttl_s": 0},
        {"ttl_s": 10**9},
        {"tags": {"a b": "c"}},
        {"ttl": 5},
        {"max_uses": 0},
        {"max_uses": 100_001},
    ):
        response = api.post("/enroll-tokens", Role.OPERATOR, json=body)
        assert response.status_code == 422, (body, response.text)


def test_inventory_filters_and_pages(api: Api) -> None:
    for n in range(5):
        assert api.enroll(f"cam-{n}", tags={"site": "berlin" if n % 2 else "paris"}).status_code
    with api.context.db.session() as session:
        session.get(Device, "cam-3").online = True  # type: ignore[union-attr]
    everything = api.get("/devices", Role.VIEWER).json()
    assert everything["total"] == 5
    assert [d["id"] for d in everything["items"]] == [f"cam-{n}" for n in range(5)]
    page = api.get("/devices", params={"limit": 2, "offset": 2}).json()
    assert [d["id"] for d in page["items"]] == ["cam-2", "cam-3"] and page["total"] == 5
    berlin = api.get("/devices", params={"tag": "site=berlin"}).json()
    assert [d["id"] for d in berlin["items"]] == ["cam-1", "cam-3"]
    online = api.get("/devices", params=[("tag", "site=berlin"), ("online", "true")]).json()
    assert [d["id"] for d in online["items"]] == ["cam-3"] and online["total"] == 1
    for bad in (
        {"tag": "site"},
        {"tag": "=x"},
        {"limit": 1001},
        {"offset": -1},
        {"online": "maybe"},
        {"tag": "a b=c"},
    ):
        response = api.get("/devices", params=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"] == "invalid-request"


def test_one_device_with_reports_and_telemetry(api: Api) -> None:
    api.enroll("cam-1")
    now = api.clock()
    with api.context.db.session() as session:
        for seq, state in ((1, "downloading"), (2, "committed")):
            session.add(
                StatusReportRow(
                    device_id="cam-1",
                    sequence=seq,
                    received_at=now,
                    sent_at=now,
                    install_state=state,
                    bundle_name="demo",
                    bundle_version="1.2.3",
                    directive_sequence=7,
                    reason=None,
                )
            )
        for hours, requests in ((1, 100), (2, 50), (30, 999)):  # the last is too old
            session.add(
                TelemetryBucket(
                    device_id="cam-1",
                    bundle_name="demo",
                    bundle_version="1.2.3",
                    bucket_start=now - dt.timedelta(hours=hours),
                    windows=2,
                    requests=requests,
                    errors=3,
                    fallbacks=0,
                    latency={},
                    bins={},
                )
            )
    device = api.get("/devices/cam-1", Role.VIEWER).json()
    assert device["id"] == "cam-1"
    assert [r["install_state"] for r in device["status_reports"]] == ["committed", "downloading"]
    (summary,) = device["telemetry"]
    assert (summary["requests"], summary["errors"], summary["windows"]) == (150, 6, 4)
    assert summary["error_rate"] == pytest.approx(6 / 150)
    assert api.get("/devices/cam-404").status_code == 404
    assert api.get("/devices/a+b").status_code == 404
    assert api.get("/devices/" + "x" * 200).status_code == 422


def test_an_operator_removes_a_device_which_may_then_enroll_a_new_key(api: Api) -> None:
    spy = KeyCacheSpy()
    api.context.device_keys = spy
    assert api.enroll("cam-1").status_code == 201
    assert api.enroll("cam-2").status_code == 201
    assert api.delete("/devices/cam-1", None).status_code == 401
    forbidden = api.delete("/devices/cam-1", Role.VIEWER)
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
    assert spy.invalidated == ["cam-1", "cam-2"]

    removed = api.delete("/devices/cam-1", Role.OPERATOR)
    assert removed.status_code == 204 and removed.content == b""
    assert spy.invalidated == ["cam-1", "cam-2", "cam-1"]  # after the commit
    assert api.get("/devices/cam-1").status_code == 404
    assert [d["id"] for d in api.get("/devices").json()["items"]] == ["cam-2"]
    (entry,) = [e for e in api.get("/audit").json() if e["action"] == "device.remove"]
    assert entry["target"] == "device cam-1" and entry["role"] == "operator"

    again = api.enroll("cam-1")  # a new key: the id is free again
    assert again.status_code == 201, again.text
    assert api.delete("/devices/cam-404", Role.OPERATOR).status_code == 404
    assert api.delete("/devices/a+b", Role.OPERATOR).status_code == 404
    assert api.delete("/devices/" + "x" * 200, Role.OPERATOR).status_code == 422


def test_a_device_in_an_active_rollout_is_not_removed(api: Api) -> None:
    api.enroll("cam-1")
    rollout_id = make_rollout(api.context.db, "running", device_id="cam-1")
    refused = api.delete("/devices/cam-1", Role.OPERATOR)
    assert refused.status_code == 409 and refused.json()["error"] == "conflict"
    assert f"rollout {rollout_id} (running)" in refused.json()["detail"]
    assert "abort the rollout or wait until it ends" in refused.json()["detail"]
    assert api.get("/devices/cam-1").status_code == 200


def test_a_device_in_an_aborting_rollout_waits_for_the_abort(api: Api) -> None:
    api.enroll("cam-1")
    rollout_id = make_rollout(api.context.db, "aborting", device_id="cam-1")
    refused = api.delete("/devices/cam-1", Role.OPERATOR)
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert f"rollout {rollout_id} (aborting)" in detail and "abort the rollout" not in detail
    assert "wait until the abort has rolled its devices back" in detail
