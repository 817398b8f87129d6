"""Rate limiting: a token bucket per API token, and per client address for enrollment and
for failed logins apart; 429 with Retry-After."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi import FastAPI

from edgefleet.server.api.ratelimit import RateLimiter
from edgefleet.server.db.database import Database
from edgefleet.server.errors import RateLimitedError
from edgefleet.server.principals import Role
from edgefleet.server.runner import http_config
from edgefleet.trust import TrustRoot
from tests.agent.broker import free_port
from tests.server.apiclient import make_api, serve


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_at_the_rate_and_says_when() -> None:
    ticks = Ticks()
    limiter = RateLimiter(6, clock=ticks)  # one every 10 s, bursts of 6
    for _ in range(6):
        limiter.check("a")
    with pytest.raises(RateLimitedError) as refused:
        limiter.check("a")
    assert refused.value.retry_after == 10
    limiter.check("b")  # other callers have their own bucket
    ticks.now += 9.0
    with pytest.raises(RateLimitedError) as again:
        limiter.check("a")
    assert again.value.retry_after == 1
    ticks.now += 1.0
    limiter.check("a")


def test_429_with_retry_after_per_token(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, api_rate_per_minute=3)
    for _ in range(3):
        assert api.get("/bundles", Role.VIEWER).status_code == 200
    limited = api.get("/bundles", Role.VIEWER)
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate-limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 20
    assert api.get("/bundles", Role.OPERATOR).status_code == 200  # another token


def test_enrollment_and_failed_logins_are_limited_per_address(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, api_rate_per_minute=3)
    codes = [api.enroll(f"cam-{n}").status_code for n in range(4)]
    assert codes == [201, 201, 201, 429]
    api2 = make_api(sqlite_database, tmp_path / "2", trust, api_rate_per_minute=2)
    guesses = [api2.get("/bundles", "efa_guess").status_code for _ in range(3)]
    assert guesses == [401, 401, 429]


def test_failed_logins_do_not_throttle_enrollment_from_the_same_address(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    # time stands still: no bucket refills while the test runs, however slow the machine
    cast(FastAPI, api.client.app).state.limiter = RateLimiter(3, clock=Ticks())
    guesses = [api.get("/bundles", "efa_guess").status_code for _ in range(10)]
    assert guesses == [401] * 3 + [429] * 7
    assert api.enroll("cam-1").status_code == 201
    # nor does enrollment throttle failed logins: each has its own bucket
    assert [api.enroll(f"cam-{n}").status_code for n in range(2, 5)] == [201, 201, 429]
    assert api.get("/bundles", "efa_guess").status_code == 429
    assert api.get("/bundles", Role.VIEWER).status_code == 200  # a valid token: its own


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        ("127.0.0.1", [401, 401, 401, 401]),  # the proxy's clients: a bucket each
        (None, [401, 401, 429, 429]),  # X-Forwarded-For ignored: one bucket, the proxy's
        ("10.0.0.0/8", [401, 401, 429, 429]),  # the peer is not a trusted proxy
    ],
)
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
    sqlite_database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    trusted: str | None,
    expected: list[int],
) -> None:
    api = make_api(
        sqlite_database,
        tmp_path,
        trust,
        api_rate_per_minute=2,
        port=free_port(),
        forwarded_allow_ips=trusted,
    )
    app = cast(FastAPI, api.client.app)
    with serve(api, http_config(app, api.context.settings)) as url:
        codes = [
            httpx.get(
                f"{url}/api/v1/bundles",
                headers={"Authorization": "Bearer efa_guess", "X-Forwarded-For": client},
            ).status_code
            for client in ("203.0.113.1", "203.0.113.2") * 2
        ]
    assert codes == expected
