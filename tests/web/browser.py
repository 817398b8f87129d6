"""Headless Chromium for the page tests: where it is, and what a page did while it ran.

Playwright cannot download its own browsers here: the tests drive the system's
Chromium (`/usr/bin/chromium`, or `EDGEFLEET_CHROMIUM`). Without it they skip,
unless `EDGEFLEET_REQUIRE_CHROMIUM=1` (CI), where they fail.

`Watched` records, for every page of a browser context, the console's errors,
uncaught script errors, every request's URL and every address a frame went to:
what `assert_clean` checks (nothing from another host, no error, no secret in a
URL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Frame, Page, Request

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def chromium_or_skip() -> str:
    """The Chromium executable to drive; a skip (or, in CI, a failure) without one."""
    path = os.environ.get("EDGEFLEET_CHROMIUM") or DEFAULT_CHROMIUM
    if Path(path).is_file() and os.access(path, os.X_OK):
        return path
    if os.environ.get("EDGEFLEET_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"no Chromium at {path} and EDGEFLEET_REQUIRE_CHROMIUM=1")
    pytest.skip(f"no Chromium at {path} (apt-get install chromium, or set EDGEFLEET_CHROMIUM)")


def artefacts_dir(default: Path) -> Path:
    """Where screenshots go: $EDGEFLEET_ARTIFACTS when set, else `default`."""
    chosen = os.environ.get("EDGEFLEET_ARTIFACTS")
    directory = Path(chosen) / "browser" if chosen else default
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Watched:
    """What the pages of one browser context did (module docstring)."""

    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # errors a test caused on purpose

    def attach(self, context: BrowserContext) -> None:
        context.on("page", self._watch)
        context.on("request", self._request)

    def _watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("framenavigated", self._navigated)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url')})")

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _navigated(self, frame: Frame) -> None:
        self.addresses.append(frame.url)

    def expect_refusal(self, status: int, url: str) -> None:
        """The console error Chromium logs for a refusal the test asked for."""
        self.expected.append(f"status of {status} ({HTTPStatus(status).phrase}) ({url})")

    def assert_clean(self, *secrets: str) -> None:
        """No console or script error (but those expected), no request off the origin,
        no secret in any URL."""
        unexpected = [e for e in self.errors if not any(e.endswith(x) for x in self.expected)]
        assert not unexpected, unexpected
        foreign = [url for url in self.requests if not url.startswith(self.origin + "/")]
        assert not foreign, f"requests to other hosts: {foreign}"
        for secret in secrets:
            leaked = [url for url in self.requests + self.addresses if secret in url]
            assert not leaked, f"a secret in a URL: {leaked}"


__all__ = ["Watched", "artefacts_dir", "chromium_or_skip"]
