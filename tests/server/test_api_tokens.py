"""API tokens and the audit log through the API (admin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api


@pytest.fixture
def api(database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(database, tmp_path, trust)


def test_create_shows_the_secret_once_and_list_never(api: Api) -> None:
    created = api.post("/tokens", json={"name": "deploy bot", "role": "operator"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "deploy bot" and body["role"] == "operator"
    assert body["token"].startswith("efa_") and body["revoked_at"] is None
    assert api.get("/bundles", body["token"]).status_code == 200

    listed = api.get("/tokens").json()
    assert [t["name"] for t in listed][-1] == "deploy bot"
    text = api.get("/tokens").text
    assert body["token"] not in text and "token_hash" not in text
    assert all(set(t) == {"id", "name", "role", "created_at", "revoked_at"} for t in listed)


def test_revoke_is_audited_and_unknown_ids_are_404(api: Api) -> None:
    token = api.post("/tokens", json={"name": "temp", "role": "viewer"}).json()
    assert api.delete(f"/tokens/{token['id']}").status_code == 204
    assert api.delete(f"/tokens/{token['id']}").status_code == 204  # idempotent
    revoked = [t for t in api.get("/tokens").json() if t["id"] == token["id"]]
    assert revoked[0]["revoked_at"] is not None
    missing = api.delete("/tokens/999999")
    assert missing.status_code == 404 and missing.json()["error"] == "not-found"

    actions = [(e["action"], e["target"]) for e in api.get("/audit").json()]
    assert actions[:2] == [
        ("token.revoke", f"token {token['id']}"),
        ("token.create", f"token {token['id']}"),
    ]  # newest first, revoked once
    entry = api.get("/audit").json()[1]
    assert entry["actor"].startswith("admin-") and entry["role"] == "admin"
    assert entry["details"] == {"name": "temp", "role": "viewer"}


def test_bad_token_requests_are_422(api: Api) -> None:
    for body in (
        {"name": "x", "role": "root"},
        {"name": "", "role": "viewer"},
        {"name": "x" * 129, "role": "viewer"},
        {"name": "nul\u0000", "role": "viewer"},
        {"name": "x", "role": "viewer", "admin": True},
        {"role": "viewer"},
    ):
        response = api.post("/tokens", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"] == "invalid-request"
    assert api.get("/tokens/1").status_code == 405
    assert api.delete("/tokens/abc").status_code == 422
    assert api.delete("/tokens/99999999999999999999").status_code == 422


def test_audit_pages_back_with_before_id(api: Api) -> None:
    for n in range(5):
        api.post("/tokens", json={"name": f"t{n}", "role": "viewer"})
    first = api.get("/audit", params={"limit": 2}).json()
    assert [e["details"]["name"] for e in first] == ["t4", "t3"]
    more = api.get("/audit", params={"limit": 2, "before_id": first[-1]["id"]}).json()
    assert [e["details"]["name"] for e in more] == ["t2", "t1"]
    assert api.get("/audit", params={"limit": 0}).status_code == 422
    assert api.get("/audit", params={"limit": 5000}).status_code == 422
    assert api.get("/audit", Role.VIEWER).status_code == 403
