"""Login, sessions, CSRF and roles of the pages (TestClient on a real SQLite database)."""

from __future__ import annotations

import hashlib
from http.cookies import SimpleCookie

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from sqlalchemy import select

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import WebSession
from edgefleet.server.principals import Role
from edgefleet.server.tokens import authenticate
from edgefleet.server.web.auth import SESSION_COOKIE, OperatorPage, ViewerPage, safe_next
from edgefleet.server.web.sessions import SESSION_LIFETIME
from tests.server.apiclient import Api, make_api
from tests.web.conftest import csrf_of, new_browser, sign_in


def set_cookie_of(response: object) -> SimpleCookie:
    headers = response.headers.get_list("set-cookie")  # type: ignore[attr-defined]
    assert len(headers) == 1, headers
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(headers[0])
    return cookie


def test_login_sets_a_strict_http_only_session_cookie(web: Api) -> None:
    response = new_browser(web).post("/login", data={"token": web.tokens[Role.VIEWER]})
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    morsel = set_cookie_of(response)[SESSION_COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "strict"
    assert morsel["path"] == "/"
    assert morsel["max-age"] == str(int(SESSION_LIFETIME.total_seconds()))
    assert not morsel["secure"]  # plain http: a Secure cookie would never come back
    assert web.tokens[Role.VIEWER] not in response.headers["location"]


@pytest.mark.parametrize("origin", ["https://elsewhere.example", "null"])
def test_a_login_form_sent_from_another_site_is_refused(web: Api, origin: str) -> None:
    browser = new_browser(web)
    response = browser.post(
        "/login", data={"token": web.tokens[Role.VIEWER]}, headers={"Origin": origin}
    )
    assert response.status_code == 403, response.text
    assert "set-cookie" not in response.headers
    own = browser.post(
        "/login",
        data={"token": web.tokens[Role.VIEWER]},
        headers={"Origin": f"http://{browser.base_url.netloc.decode()}"},
    )
    assert own.status_code == 303, own.text


def test_login_over_https_sets_a_secure_cookie(web: Api) -> None:
    browser = TestClient(web.client.app, base_url="https://testserver", follow_redirects=False)
    response = browser.post("/login", data={"token": web.tokens[Role.VIEWER]})
    assert response.status_code == 303
    assert set_cookie_of(response)[SESSION_COOKIE]["secure"] is True


def test_the_login_form_posts_the_token_and_never_puts_it_in_a_url(web: Api) -> None:
    page = new_browser(web).get("/login").text
    assert '<form class="login" method="post" action="/login">' in page
    assert 'name="token" type="password"' in page


def test_the_database_keeps_only_the_hash_of_the_session_id(web: Api) -> None:
    browser, csrf = sign_in(web, Role.VIEWER)
    session_id = browser.cookies[SESSION_COOKIE]
    with web.context.db.session() as session:
        (row,) = session.scalars(select(WebSession))
    assert row.id_hash == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in (row.id_hash, row.csrf_token)
    assert row.csrf_token == csrf
    assert row.expires_at == web.clock() + SESSION_LIFETIME


@pytest.mark.parametrize("token", ["", "efa_not-a-token", "efe_an-enrollment-token", "é"])
def test_a_wrong_token_is_refused_without_a_session(web: Api, token: str) -> None:
    response = new_browser(web).post("/login", data={"token": token, "next": "/devices"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "unknown or revoked API token" in response.text
    assert 'name="next" value="/devices"' in response.text  # kept for the next attempt
    with web.context.db.session() as session:
        assert session.scalars(select(WebSession)).all() == []


def test_failed_logins_are_rate_limited_per_address(
    sqlite_database: Database, tmp_path: object, trust: object
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, api_rate_per_minute=3)  # type: ignore[arg-type]
    browser = new_browser(api)
    statuses = [browser.post("/login", data={"token": "efa_wrong"}).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    refused = browser.post("/login", data={"token": "efa_wrong"})
    assert "too many requests" in refused.text
    # the API's failed authentications share the bucket: it is empty for them too
    assert api.get("/devices", "efa_wrong").status_code == 429


def test_logout_ends_the_session(web: Api) -> None:
    browser, csrf = sign_in(web, Role.VIEWER)
    session_id = browser.cookies[SESSION_COOKIE]
    response = browser.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert set_cookie_of(response)[SESSION_COOKIE]["max-age"] == "0"
    # the old cookie, replayed, opens nothing
    replay = new_browser(web)
    replay.cookies.set(SESSION_COOKIE, session_id)
    assert replay.get("/").status_code == 303
    with web.context.db.session() as session:
        assert session.scalars(select(WebSession)).all() == []


def test_a_page_without_a_session_redirects_to_login_and_back(web: Api) -> None:
    browser = new_browser(web)
    response = browser.get("/devices?online=yes&sort=health")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fdevices%3Fonline%3Dyes%26sort%3Dhealth"
    signed = browser.post(
        "/login", data={"token": web.tokens[Role.VIEWER], "next": "/devices?online=yes&sort=health"}
    )
    assert signed.headers["location"] == "/devices?online=yes&sort=health"
    assert browser.get(signed.headers["location"]).status_code == 200


def test_an_unknown_cookie_redirects_to_login(web: Api) -> None:
    browser = new_browser(web)
    browser.cookies.set(SESSION_COOKIE, "made-up")
    response = browser.get("/")
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


@pytest.mark.parametrize(
    "next_path",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/\t/evil.example",
        "",
    ],
)
def test_next_cannot_leave_the_site(web: Api, next_path: str) -> None:
    response = new_browser(web).post(
        "/login", data={"token": web.tokens[Role.VIEWER], "next": next_path}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    assert safe_next(next_path) == "/"


def test_the_login_form_carries_only_a_safe_next(web: Api) -> None:
    page = new_browser(web).get("/login", params={"next": "//evil.example"}).text
    assert 'name="next" value="/"' in page
    page = new_browser(web).get("/login", params={"next": "/devices?tag=site=berlin"}).text
    assert 'name="next" value="/devices?tag=site=berlin"' in page


def test_a_revoked_token_ends_its_sessions(web: Api) -> None:
    created = web.post("/tokens", json={"name": "field", "role": "viewer"})
    assert created.status_code == 201, created.text
    browser = new_browser(web)
    assert browser.post("/login", data={"token": created.json()["token"]}).status_code == 303
    assert browser.get("/").status_code == 200
    assert web.delete(f"/tokens/{created.json()['id']}").status_code == 204
    assert browser.get("/").status_code == 303
    with web.context.db.session() as session:
        assert session.scalars(select(WebSession)).all() == []


def test_a_session_expires(web: Api) -> None:
    browser, _ = sign_in(web, Role.VIEWER)
    web.clock.advance(SESSION_LIFETIME.total_seconds() - 1)
    assert browser.get("/").status_code == 200
    web.clock.advance(1)
    assert browser.get("/").status_code == 303


def test_the_bearer_token_is_not_a_session(web: Api) -> None:
    response = new_browser(web).get("/", headers=web.auth(Role.ADMIN))
    assert response.status_code == 303


# --- CSRF and roles, on routes of the pages' own dependencies


def with_test_routes(api: Api) -> FastAPI:
    """The app, with two routes behind the pages' viewer and operator dependencies."""
    app = api.client.app
    assert isinstance(app, FastAPI)

    @app.post("/test/look")
    def look(user: ViewerPage) -> PlainTextResponse:
        return PlainTextResponse(f"looked: {user.name}")

    @app.post("/test/act")
    def act(user: OperatorPage) -> PlainTextResponse:
        return PlainTextResponse(f"acted: {user.name}")

    return app


def sign_in_to(app: FastAPI, api: Api, role: Role) -> tuple[TestClient, str]:
    browser = TestClient(app, follow_redirects=False)
    assert browser.post("/login", data={"token": api.tokens[role]}).status_code == 303
    return browser, csrf_of(browser.get("/").text)


def test_a_post_without_the_csrf_token_is_403(web: Api) -> None:
    app = with_test_routes(web)
    browser, csrf = sign_in_to(app, web, Role.ADMIN)
    assert browser.post("/test/look").status_code == 403
    assert browser.post("/test/look", data={"csrf_token": ""}).status_code == 403
    assert browser.post("/test/look", data={"csrf_token": csrf[:-1] + "x"}).status_code == 403
    refused = browser.post("/test/act", data={"csrf_token": "é"})
    assert refused.status_code == 403
    assert "security token is missing or stale" in refused.text
    accepted = browser.post("/test/look", data={"csrf_token": csrf})
    assert accepted.status_code == 200
    assert accepted.text.startswith("looked: admin-")


def test_the_csrf_token_is_bound_to_the_session(web: Api) -> None:
    app = with_test_routes(web)
    _, first_csrf = sign_in_to(app, web, Role.OPERATOR)
    second, second_csrf = sign_in_to(app, web, Role.OPERATOR)
    assert first_csrf != second_csrf
    assert second.post("/test/act", data={"csrf_token": first_csrf}).status_code == 403
    assert second.post("/test/act", data={"csrf_token": second_csrf}).status_code == 200


def test_logout_needs_the_csrf_token(web: Api) -> None:
    browser, _ = sign_in(web, Role.VIEWER)
    assert browser.post("/logout").status_code == 403
    assert browser.get("/").status_code == 200  # still signed in


@pytest.mark.parametrize(
    ("role", "look", "act"),
    [(Role.VIEWER, 200, 403), (Role.OPERATOR, 200, 200), (Role.ADMIN, 200, 200)],
)
def test_viewers_see_and_operators_act(web: Api, role: Role, look: int, act: int) -> None:
    app = with_test_routes(web)
    browser, csrf = sign_in_to(app, web, role)
    assert browser.post("/test/look", data={"csrf_token": csrf}).status_code == look
    response = browser.post("/test/act", data={"csrf_token": csrf})
    assert response.status_code == act
    if act == 403:
        assert "has the viewer role; this needs operator" in response.text


def test_the_layout_names_who_is_signed_in(web: Api) -> None:
    browser, _ = sign_in(web, Role.OPERATOR)
    page = browser.get("/").text
    assert f"Signed in as <strong>{operator_name(web)}</strong> (operator)" in page
    assert '<button type="submit">Log out</button>' in page
    assert '<a class="skip-link" href="#main">' in page


def operator_name(api: Api) -> str:
    with api.context.db.session() as session:
        return authenticate(session, api.tokens[Role.OPERATOR]).name
