"""Authentication and roles: who may call what, and how the API says no."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute

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
    response = api.client.get("/api/v1/bundles", headers={b"Authorization": header.encode()})
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
    assert api.get("/health", None).json() == {
        "status": "ok",
        "database": "ok",
        "mqtt": None,
        "ingestion": None,
        "reason": None,
    }
    assert api.client.get("/metrics").status_code == 200
    assert_error(api.get("/blobs/" + "0" * 64, None), 404, "not-found")


# Every /api/v1 route and method, and the role it needs (None: public). A route that
# is not listed fails `test_every_route_needs_its_role`: add it here, with its role.
REQUIRED_ROLE: dict[tuple[str, str], Role | None] = {
    ("GET", "/api/v1/health"): None,
    ("GET", "/api/v1/openapi.json"): None,
    ("GET", "/api/v1/docs"): None,
    ("GET", "/api/v1/blobs/{sha256}"): None,  # devices download by digest
    ("POST", "/api/v1/devices/enroll"): None,  # an enrollment token in the body
    ("POST", "/api/v1/enroll-tokens"): Role.OPERATOR,
    ("POST", "/api/v1/bundles"): Role.OPERATOR,
    ("POST", "/api/v1/trust"): Role.ADMIN,
    ("GET", "/api/v1/trust"): Role.VIEWER,
    ("GET", "/api/v1/bundles"): Role.VIEWER,
    ("GET", "/api/v1/bundles/{name}/{version}"): Role.VIEWER,
    ("GET", "/api/v1/bundles/{name}/{version}/file"): Role.VIEWER,
    ("GET", "/api/v1/devices"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id}"): Role.VIEWER,
    ("DELETE", "/api/v1/devices/{device_id}"): Role.OPERATOR,
    ("GET", "/api/v1/devices/{device_id}/history"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id}/diagnostics"): Role.VIEWER,
    ("POST", "/api/v1/devices/{device_id}/diagnostics"): Role.OPERATOR,
    ("POST", "/api/v1/rollouts"): Role.OPERATOR,
    ("GET", "/api/v1/rollouts"): Role.VIEWER,
    ("GET", "/api/v1/rollouts/{rollout_id}"): Role.VIEWER,
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): Role.OPERATOR,
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): Role.OPERATOR,
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): Role.OPERATOR,
    ("GET", "/api/v1/alerts"): Role.VIEWER,
    ("POST", "/api/v1/alerts/{alert_id}/ack"): Role.OPERATOR,
    ("GET", "/api/v1/accuracy"): Role.VIEWER,
    ("GET", "/api/v1/webhooks/deliveries"): Role.VIEWER,
    ("POST", "/api/v1/webhooks/deliveries/{delivery_id}/retry"): Role.OPERATOR,
    ("POST", "/api/v1/devices/{device_id}/samples"): None,  # signed with the device's key
    ("POST", "/api/v1/devices/{device_id}/certificate"): None,  # signed with the device's key
    ("GET", "/api/v1/ca/certificate"): None,  # public
    ("GET", "/api/v1/ca/crl"): None,  # public
    ("GET", "/api/v1/samples"): Role.VIEWER,
    ("GET", "/api/v1/samples/{sample_id}"): Role.OPERATOR,
    ("GET", "/api/v1/dead-letters"): Role.VIEWER,
    ("GET", "/api/v1/dead-letters/{letter_id}"): Role.OPERATOR,
    ("POST", "/api/v1/dead-letters/{letter_id}/replay"): Role.OPERATOR,
    ("DELETE", "/api/v1/dead-letters/{letter_id}"): Role.OPERATOR,
    ("POST", "/api/v1/tokens"): Role.ADMIN,
    ("GET", "/api/v1/tokens"): Role.ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): Role.ADMIN,
    ("GET", "/api/v1/audit"): Role.ADMIN,
    ("POST", "/api/v1/benchmarks"): Role.OPERATOR,
    ("GET", "/api/v1/benchmarks/{benchmark_id}"): Role.VIEWER,
    ("GET", "/api/v1/benchmarks/{benchmark_id}/request"): None,  # devices verify what they get
    ("POST", "/api/v1/devices/{device_id}/benchmarks/{benchmark_id}"): None,  # device-signed
}
# Path parameters naming nothing stored: a request that gets past the role check
# changes nothing (404 or 422).
PATH_VALUES = {
    "sha256": "0" * 64,
    "name": "nothing",
    "version": "9.9.9",
    "device_id": "no-such-device",
    "rollout_id": "999999",
    "token_id": "999999",
    "alert_id": "999999",
    "sample_id": "999999",
    "letter_id": "999999",
    "delivery_id": "999999",
    "benchmark_id": "999999",
}
BELOW = {Role.OPERATOR: Role.VIEWER, Role.ADMIN: Role.OPERATOR}


def walk(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, also those of included routers (FastAPI >= 0.160 keeps an included
    router as one entry; before, its routes were copied into the app's list). Our
    routers carry their full prefix and are included without one, so a route's
    own path is the path it serves."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from walk(included.routes)
        else:
            yield route


def app_routes(api: Api) -> set[tuple[str, str]]:
    """(method, path template) of every route under /api/v1.

    HEAD is left out: Starlette adds it to GET routes and answers it as the GET.
    """
    found: set[tuple[str, str]] = set()
    for route in walk(cast(FastAPI, api.client.app).routes):
        path = getattr(route, "path", "")
        if path.startswith("/api/v1/"):
            found.update((m, path) for m in getattr(route, "methods", None) or () if m != "HEAD")
    return found


def test_every_route_needs_its_role(api: Api) -> None:
    routes = app_routes(api)
    assert routes - set(REQUIRED_ROLE) == set(), "routes missing from REQUIRED_ROLE"
    assert set(REQUIRED_ROLE) - routes == set(), "REQUIRED_ROLE lists routes the app lacks"
    for (method, template), required in sorted(REQUIRED_ROLE.items(), key=str):
        path = template.format(**PATH_VALUES)
        route = f"{method} {template}"
        anonymous = api.client.request(method, path)
        if required is None:
            assert anonymous.status_code not in (401, 403), (route, anonymous.text)
            continue
        assert anonymous.status_code == 401, (route, anonymous.text)
        assert anonymous.json()["error"] == "auth"
        if required in BELOW:
            below = api.client.request(method, path, headers=api.auth(BELOW[required]))
            assert below.status_code == 403, (route, below.text)
            assert below.json()["error"] == "forbidden"
        allowed = api.client.request(method, path, headers=api.auth(required))
        assert allowed.status_code not in (401, 403), (route, allowed.text)
