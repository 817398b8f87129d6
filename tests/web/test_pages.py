"""The overview and the device list show what the database holds; no page leaves the site."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import insert

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, Device, Rollout, RolloutState
from edgefleet.server.principals import Role
from edgefleet.server.web.devicelist import HEALTH_STATES, PAGE_SIZE
from edgefleet.server.web.overview import fleet_overview
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api
from tests.server.rolloutsim import add_bundle
from tests.web.conftest import sign_in

FLEET = 10_000
SITES = ("berlin", "oslo", "paris")
MODELS: tuple[tuple[str | None, str | None], ...] = (
    (None, None),
    ("digits", "1.0.0"),
    ("digits", "1.1.0"),
    ("cats", "2.0.0"),
)
HEALTHS = ("ok", "degraded", "ok", "failing", "unknown")


@dataclass(frozen=True)
class Row:
    id: str
    site: str
    online: bool
    last_seen: dt.datetime | None
    model_name: str | None
    model_version: str | None
    health: str


def fleet_rows(now: dt.datetime) -> list[Row]:
    rows = []
    for i in range(FLEET):
        name, version = MODELS[i % len(MODELS)]
        rows.append(
            Row(
                id=f"dev-{i:05d}",
                site=SITES[i % len(SITES)],
                online=i % 2 == 0,
                last_seen=None if i % 10 == 9 else now - dt.timedelta(seconds=(i * 7919) % 86_400),
                model_name=name,
                model_version=version,
                health=HEALTHS[i % len(HEALTHS)],
            )
        )
    return rows


def insert_fleet(database: Database, rows: list[Row], now: dt.datetime) -> None:
    """The devices, in one INSERT of many rows (enrolling 10,000 through the API is slow)."""
    with database.session() as session:
        session.execute(
            insert(Device),
            [
                {
                    "id": row.id,
                    "public_key": "00" * 32,
                    "enrolled_at": now - dt.timedelta(days=30),
                    "profile": "x86_64-avx2",
                    "arch": "x86_64",
                    "runtimes": ["onnxruntime"],
                    "agent_version": "1.0.0",
                    "tags": {"site": row.site},
                    "online": row.online,
                    "last_seen": row.last_seen,
                    "model_name": row.model_name,
                    "model_version": row.model_version,
                    "health": row.health,
                    "status_sequence": 0,
                    "directive_sequence": 0,
                }
                for row in rows
            ],
        )


DEVICE_LINK = re.compile(r'<td data-label="Device"><a href="/devices/([^"]+)">')


def listed(page: str) -> list[str]:
    return DEVICE_LINK.findall(page)


def by_version(row: Row) -> tuple[Any, ...]:
    return (row.model_name is None, row.model_name or "", row.model_version or "", row.id)


def by_last_seen(row: Row) -> tuple[Any, ...]:
    seen = row.last_seen.timestamp() if row.last_seen else 0.0
    return (row.last_seen is None, -seen, row.id)


def by_health(row: Row) -> tuple[Any, ...]:
    return (HEALTH_STATES.index(row.health), row.id)


@pytest.fixture
def fleet_web(database: Database, tmp_path: Path, trust: TrustRoot) -> tuple[Api, list[Row]]:
    api = make_api(database, tmp_path, trust)
    rows = fleet_rows(api.clock())
    insert_fleet(database, rows, api.clock())
    return api, rows


def test_the_device_list_filters_sorts_and_pages_10000_devices(
    fleet_web: tuple[Api, list[Row]],
) -> None:
    api, rows = fleet_web
    browser, _ = sign_in(api, Role.VIEWER)
    ids = sorted(row.id for row in rows)

    first = browser.get("/devices").text
    assert listed(first) == ids[:PAGE_SIZE]
    assert f"{FLEET} devices, page 1 of {FLEET // PAGE_SIZE}." in first
    assert '<a href="/devices?page=2" rel="next">Next page</a>' in first
    last = browser.get(f"/devices?page={FLEET // PAGE_SIZE}").text
    assert listed(last) == ids[-PAGE_SIZE:]
    assert 'rel="next"' not in last

    wanted = sorted(
        row.id
        for row in rows
        if row.site == "paris"
        and row.online
        and (row.model_name, row.model_version) == ("digits", "1.1.0")
        and row.health == "ok"
    )
    filtered = browser.get(
        "/devices",
        params={"tag": "site=paris", "online": "yes", "model": "digits@1.1.0", "health": "ok"},
    ).text
    assert listed(filtered) == wanted[:PAGE_SIZE]
    assert f"{len(wanted)} devices, page 1 of" in filtered

    offline_cats = sorted(r.id for r in rows if not r.online and r.model_name == "cats")
    page2 = browser.get("/devices?online=no&model=cats&page=2").text
    assert listed(page2) == offline_cats[PAGE_SIZE : 2 * PAGE_SIZE]
    assert '<a href="/devices?model=cats&amp;online=no" rel="prev">' in page2

    for sort, key in (("version", by_version), ("last_seen", by_last_seen), ("health", by_health)):
        expected = [row.id for row in sorted(rows, key=key)]
        assert (
            listed(browser.get(f"/devices?sort={sort}&page=3").text)
            == (expected[2 * PAGE_SIZE : 3 * PAGE_SIZE])
        ), sort


def test_the_device_list_shows_each_device_with_its_verdict(web: Api) -> None:
    now = web.clock()
    rows = [
        Row("cam-1", "berlin", True, now, "digits", "1.0.0", "failing"),
        Row("cam-2", "oslo", False, None, None, None, "unknown"),
    ]
    insert_fleet(web.context.db, rows, now)
    browser, _ = sign_in(web, Role.VIEWER)
    page = browser.get("/devices").text
    assert listed(page) == ["cam-1", "cam-2"]
    first, second = page.split('<td data-label="Device">')[1:]
    assert '<span class="state state-online">online</span>' in first
    assert '<span class="state state-failing">failing</span>' in first  # the verdict and health
    assert "digits@1.0.0" in first
    assert "site=berlin" in first
    assert '<span class="state state-offline">offline</span>' in second
    assert "never connected" in second
    assert '<td data-label="Model">none</td>' in second


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("health=sick", "health 'sick' is not one of"),
        ("online=maybe", "online 'maybe' is not yes or no"),
        ("sort=colour", "sort 'colour' is not one of"),
        ("page=0", "page '0' is not a page number"),
        ("page=x", "page 'x' is not a page number"),
        ("tag=site", "write tags as KEY=VALUE"),
    ],
)
def test_a_bad_filter_is_a_422_page_that_says_what_to_write(
    web: Api, query: str, words: str
) -> None:
    browser, _ = sign_in(web, Role.VIEWER)
    response = browser.get(f"/devices?{query}")
    assert response.status_code == 422
    assert words in response.text.replace("&#39;", "'")
    assert response.headers["content-type"].startswith("text/html")


def test_the_overview_shows_what_the_database_holds(web: Api) -> None:
    now = web.clock()
    rows = [
        Row("a-1", "berlin", True, now, "digits", "1.0.0", "ok"),
        Row("a-2", "berlin", True, now, "digits", "1.0.0", "failing"),
        Row("a-3", "oslo", True, now, "digits", "1.1.0", "degraded"),
        Row("a-4", "oslo", False, now, "digits", "1.0.0", "ok"),
        Row("a-5", "oslo", False, None, None, None, "unknown"),
    ]
    insert_fleet(web.context.db, rows, now)
    bundle_id = add_bundle(web.context.db, name="digits", version="1.1.0", now=now)
    with web.context.db.session() as session:
        for state, stage in ((RolloutState.PAUSED, 1), (RolloutState.COMPLETED, 2)):
            session.add(
                Rollout(
                    bundle_id=bundle_id,
                    selector={},
                    plan={"stages": [{"percent": 10}, {"percent": 50}, {"percent": 100}]},
                    state=state,
                    stage_index=stage,
                    created_by="ops",
                    created_at=now,
                    updated_at=now,
                )
            )
        for kind, device, resolved in (
            ("feature-drift", "a-1", None),
            ("feature-drift", "a-2", None),
            ("accuracy-drop", "a-3", None),
            ("dataset-drift", "a-4", now),
        ):
            session.add(
                Alert(
                    kind=kind,
                    scope="device",
                    device_id=device,
                    bundle_name="digits",
                    bundle_version="1.0.0",
                    feature="pixels[3]" if kind == "feature-drift" else None,
                    opened_at=now - dt.timedelta(minutes=len(device)),
                    resolved_at=resolved,
                    evidence={},
                )
            )
    with web.context.db.session() as session:
        overview = fleet_overview(session)
    assert (overview.online, overview.offline) == (3, 2)
    assert [(v.model_name, v.model_version, v.devices) for v in overview.versions] == [
        ("digits", "1.0.0", 3),
        ("digits", "1.1.0", 1),
        (None, None, 1),
    ]
    assert overview.health == {"failing": 1, "degraded": 1, "unknown": 0, "ok": 1}
    assert overview.open_alerts == {"accuracy-drop": 1, "feature-drift": 2}
    assert [r.state for r in overview.rollouts] == ["paused"]
    assert (overview.rollouts[0].stage, overview.rollouts[0].stages) == (2, 3)

    browser, _ = sign_in(web, Role.VIEWER)
    page = " ".join(browser.get("/").text.split())
    assert '<p class="figure">5</p>' in page
    assert 'state-online">online</span></a><span>3</span>' in page
    assert 'state-offline">offline</span></a><span>2</span>' in page
    assert 'href="/devices?model=digits%401.0.0">digits@1.0.0</a><span>3</span>' in page
    assert "<span>no model installed</span><span>1</span>" in page
    assert 'state-failing">failing</span></a><span>1</span>' in page
    assert "<span>feature-drift</span><span>2</span>" in page
    assert 'href="/devices/a-3">a-3</a>' in page  # among the newest open alerts
    assert "dataset-drift" not in page  # resolved
    assert (
        '#1 digits@1.1.0</a> <span><span class="state state-paused">paused</span> stage 2 of 3'
        in page
    )


class Links(HTMLParser):
    """Every URL a page refers to: src, href, action."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action") and value is not None:
                self.urls.append(value)


def urls_of(page: str) -> list[str]:
    parser = Links()
    parser.feed(page)
    return parser.urls


def test_no_page_nor_the_api_docs_refers_to_another_host(web: Api) -> None:
    insert_fleet(web.context.db, fleet_rows(web.clock())[:3], web.clock())
    browser, _ = sign_in(web, Role.ADMIN)
    pages = {
        "/login": browser.get("/login"),
        "/": browser.get("/"),
        "/devices": browser.get("/devices"),
        "/api/v1/docs": browser.get("/api/v1/docs"),
    }
    for path, response in pages.items():
        assert response.status_code == 200, path
        urls = urls_of(response.text)
        assert urls, path
        for url in urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{path} refers to {url}"
            if parts.path.startswith("/static/"):
                assert browser.get(parts.path).status_code == 200, url
    docs = pages["/api/v1/docs"].text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in docs
    assert "http://" not in docs and "https://" not in docs
    assert '"validatorUrl": null' in docs
    assert "http" not in browser.get("/static/style.css").text


def test_pages_forbid_other_origins_for_their_parts(web: Api) -> None:
    response = web.client.get("/login")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["cache-control"] == "no-store"
