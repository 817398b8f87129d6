"""Bad input anywhere is a 4xx with {"error", "detail"}, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import API, Api, make_api


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(sqlite_database, tmp_path, trust)


def error_of(response: object, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body: dict[str, str] = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error", "detail"} and body["detail"]
    return body


@pytest.mark.parametrize(
    ("content", "word"),
    [
        (b"{", "JSON"),
        (b"{'name': 'x'}", "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[]", "body"),
        (b"null", "body"),
        (b'"name"', "body"),
        (b'{"name": 5, "role": "viewer"}', "body.name"),
        (b'{"name": "a", "role": "viewer", "x": 1}', "body.x"),
        (b'{"name": "a"}', "body.role"),
    ],
)
def test_malformed_json_wrong_types_unknown_fields(api: Api, content: bytes, word: str) -> None:
    response = api.post("/tokens", content=content, headers={"Content-Type": "application/json"})
    body = error_of(response, 422)
    assert body["error"] == "invalid-request" and word in body["detail"]


def test_huge_json_bodies_are_413_before_parsing(api: Api) -> None:
    huge = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'", "role": "viewer"}'
    declared = api.post("/tokens", content=huge, headers={"Content-Type": "application/json"})
    assert error_of(declared, 413)["error"] == "too-large"

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * 64 * 1024
        yield b'", "role": "viewer"}'

    streamed = api.post("/enroll-tokens", Role.OPERATOR, content=chunks())
    assert error_of(streamed, 413)["error"] == "too-large"
    enroll = api.post("/devices/enroll", None, content=huge)
    assert error_of(enroll, 413)["error"] == "too-large"
    assert len(api.get("/tokens").json()) == 3  # nothing was added


def test_unknown_routes_and_methods(api: Api) -> None:
    assert error_of(api.get("/nothing-here"), 404)["error"] == "not-found"
    assert error_of(api.client.put(f"{API}/bundles"), 405)["error"] == "method-not-allowed"
    assert error_of(api.client.get(f"{API}/devices/enroll"), 401)["error"] == "auth"


def test_wrong_content_type_on_json_routes(api: Api) -> None:
    response = api.post(
        "/tokens",
        content=b'{"name": "a", "role": "viewer"}',
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 422


def test_the_error_codes_match_the_client_translation(api: Api) -> None:
    from edgefleet.client.errors import error_from_response
    from edgefleet.server.errors import AuthError, ForbiddenError, NotFoundError

    cases = [
        (api.get("/bundles", None), AuthError),
        (api.get("/tokens", Role.VIEWER), ForbiddenError),
        (api.get("/rollouts/77"), NotFoundError),
    ]
    for response, cls in cases:
        error = error_from_response(response.status_code, response.content, url="x")
        assert type(error) is cls, (response.text, error)


def test_a_failing_database_is_503_not_500(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    api.context.db = Database(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    health = api.get("/health", None)
    assert health.status_code == 503 and health.json()["database"] == "unreachable"
    assert error_of(api.get("/bundles"), 503)["error"] == "storage"
    metrics = api.client.get("/metrics")
    assert metrics.status_code == 200 and "edgefleet_metrics_database_up 0.0" in metrics.text
