"""Fixtures of the page tests: an app on a real migrated database, signed-in browsers,
and a headless Chromium (`chromium`, one per test module; `tests/web/browser.py`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, sync_playwright

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api
from tests.server.conftest import database, postgres_server, sqlite_database
from tests.web.browser import chromium_or_skip

__all__ = ["database", "postgres_server", "sqlite_database"]

CSRF_PATTERN = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def web(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    """The app on SQLite, with a token per role (`web.tokens`)."""
    return make_api(sqlite_database, tmp_path, trust)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """The system's Chromium, headless, driven by Playwright (skipped without it)."""
    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_browser(api: Api) -> TestClient:
    """Another client of the same app, with its own cookie jar."""
    return TestClient(api.client.app, follow_redirects=False)


def sign_in(api: Api, role: Role) -> tuple[TestClient, str]:
    """A browser signed in with the `role` token, and its CSRF token."""
    browser = new_browser(api)
    response = browser.post("/login", data={"token": api.tokens[role]})
    assert response.status_code == 303, response.text
    return browser, csrf_of(browser.get("/").text)


def csrf_of(page: str) -> str:
    match = CSRF_PATTERN.search(page)
    assert match, "the page has no CSRF field"
    return match.group(1)
