"""Authentication and roles: who may call what, and how the API says no."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api

PLAN = {"stages": [{"percent": 50}, {"percent": 100}]}


@pytest.fixture
def api(database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(database, tmp_path, trust)


def assert_error(response: object, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body: dict[str, str] = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    assert body["detail"]
    return body


def test_no_token_is_401_with_bearer_challenge(api: Api) -> None:
    response = api.get("/bundles", None)
    assert_error(response, 401, "auth")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer efa_not-a-token", "Bearer \u00e9\u00e9", "efa_x"],
)
def test_malformed_or_unknown_credentials_are_401(api: Api, header: str) -> None:
    response = api.client.get("/api/v1/bundles", headers={"Authorization": header.encode()})
    assert_error(response, 401, "auth")


def test_an_enrollment_token_is_not_an_api_token(api: Api) -> None:
    created = api.post("/enroll-tokens", Role.OPERATOR, json={"tags": {}, "ttl_s": 600})
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    assert secret.startswith("efe_")
    assert_error(api.get("/devices", secret), 401, "auth")


def test_revoked_token_is_401_from_then_on(api: Api) -> None:
    created = api.post("/tokens", json={"name": "ci", "role": "viewer"})
    assert created.status_code == 201, created.text
    token = created.json()
    assert api.get("/bundles", token["token"]).status_code == 200
    assert api.delete(f"/tokens/{token['id']}").status_code == 204
    assert_error(api.get("/bundles", token["token"]), 401, "auth")


def test_viewer_reads_but_cannot_push_or_start_or_pause(api: Api, bundle_file: Path) -> None:
    assert api.get("/bundles", Role.VIEWER).status_code == 200
    assert api.get("/devices", Role.VIEWER).status_code == 200
    assert api.get("/rollouts", Role.VIEWER).status_code == 200
    body = assert_error(api.push(bundle_file, Role.VIEWER), 403, "forbidden")
    assert "viewer" in body["detail"] and "operator" in body["detail"]
    assert api.get("/bundles").json() == []  # nothing was stored
    start = {"bundle": "demo@1.2.3", "select": "", "plan": PLAN}
    assert_error(api.post("/rollouts", Role.VIEWER, json=start), 403, "forbidden")
    assert_error(api.post("/rollouts/1/pause", Role.VIEWER), 403, "forbidden")
    assert_error(api.post("/rollouts/1/abort", Role.VIEWER), 403, "forbidden")
    assert_error(api.post("/enroll-tokens", Role.VIEWER, json={"ttl_s": 60}), 403, "forbidden")


def test_only_admin_manages_tokens_and_reads_the_audit_log(api: Api) -> None:
    for role in (Role.VIEWER, Role.OPERATOR):
        assert_error(api.get("/tokens", role), 403, "forbidden")
        assert_error(api.get("/audit", role), 403, "forbidden")
        assert_error(
            api.post("/tokens", role, json={"name": "x", "role": "admin"}), 403, "forbidden"
        )
        assert_error(api.delete("/tokens/1", role), 403, "forbidden")
    assert api.get("/tokens").status_code == 200
    assert api.get("/audit").status_code == 200


def test_public_routes_need_no_token(api: Api) -> None:
    assert api.get("/health", None).json() == {"status": "ok", "database": "ok"}
    assert api.client.get("/metrics").status_code == 200
    assert_error(api.get("/blobs/" + "0" * 64, None), 404, "not-found")
