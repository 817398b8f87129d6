"""The pages in a real browser: headless Chromium against `edgefleet server run`,
a real mosquitto and two real agents.

One fleet per module: the server (SQLite, open enrollment), two agents enrolled
with tokens tagging them `site=north` and `site=south`, demo@1.0.0 rolled out
to the north device (completed), and demo@1.1.0 being rolled out to the south
one (a bake of an hour keeps it running). Each test opens its own browser
context (its own cookies), signs in through the form, and at its end checks
that no page logged a console or script error, asked another host for
anything, or carried the token in a URL. Every figure a page shows is compared
with the API's JSON, re-read until the two agree (heartbeats keep coming).

The rollout actions come last but one: they abort the running rollout; the
last test stops the north agent and reads its page as the device gone offline. Screenshots at
390 px and 1280 px go to $EDGEFLEET_ARTIFACTS/browser, or a directory under
the test session's temporary path; the test prints where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page

from edgefleet.agent.enrolltoken import write_enroll_token
from edgefleet.agent.layout import StateLayout
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip, unique_device_id
from tests.agent.power_loss_driver import prepare_bundles
from tests.conftest import KeySet
from tests.server.serverproc import (
    ServerProcess,
    agent_log,
    json_of,
    start_agent,
    wait_until,
    write_server_keys,
)
from tests.web.browser import Watched, artefacts_dir, chromium_or_skip

WAIT = 120.0  # seconds: the bound on every wait; a loaded machine is slow, never wrong
WIDTHS = (390, 1280)
HEALTH_ORDER = ("failing", "degraded", "unknown", "ok")
ACTIVE = ("running", "paused", "aborting")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


@dataclass(frozen=True)
class Fleet:
    server: ServerProcess
    tokens: dict[str, str]  # role -> API token
    north: str  # on demo@1.0.0
    south: str  # installing demo@1.1.0 in `rollout`
    rollout: int  # running until the rollout actions abort it
    logs: Path  # the agents' logs
    agents: dict[str, subprocess.Popen[bytes]]  # device id -> its `agent run`

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, path: str) -> Any:
        with self.server.api(self.tokens["viewer"]) as api:
            return json_of(api.get(path), 200)

    def devices(self, query: str = "") -> dict[str, dict[str, Any]]:
        listed = self.api(f"/devices?limit=1000{query}")
        return {item["id"]: item for item in listed["items"]}


def create_token(data: Path, role: str) -> str:
    return cli("server", "token", "create", "--role", role, "--name", f"web-{role}", "--data", data)


def write_plan(path: Path, bake_s: int) -> Path:
    path.write_text(f"stages: [{{percent: 100}}]\ngates: {{bake_s: {bake_s}}}\n")
    return path


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, trust: TrustRoot
) -> Iterator[Fleet]:
    mosquitto_or_skip()
    chromium_or_skip()  # before the costly part
    tmp = tmp_path_factory.mktemp("browser-fleet")
    releases = prepare_bundles(tmp_path_factory.mktemp("browser-bundles"), keyset.release)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker.running(tmp / "broker"))
        trust_path, key_path = write_server_keys(tmp / "keys", trust, keyset)
        data = tmp / "data"
        server = ServerProcess.start(
            tmp / "server.log", trust_path, key_path,
            "--data", data, "--mqtt", broker.url, "--open-enrollment",
        )  # fmt: skip
        stack.callback(server.stop)
        server.wait_healthy()
        tokens = {role: create_token(data, role) for role in ("viewer", "operator")}
        env = {"EDGEFLEET_SERVER": server.url, "EDGEFLEET_TOKEN": tokens["operator"]}
        for release in releases.releases[:2]:
            cli("bundles", "push", release, env=env)

        sites: dict[str, str] = {}
        agents: dict[str, subprocess.Popen[bytes]] = {}
        for site in ("north", "south"):
            device = unique_device_id(f"web-{site}")
            token = cli("devices", "enroll-token", "--tag", f"site={site}", env=env)
            write_enroll_token(StateLayout(tmp / device), token)
            agent = start_agent(tmp, device, broker.url, server.url, trust_path)
            stack.callback(stop_agent, agent)
            sites[site] = device
            agents[device] = agent
        fleet = Fleet(server, tokens, sites["north"], sites["south"], 0, tmp, agents)

        def online() -> bool:
            devices = fleet.devices()
            return set(devices) == set(sites.values()) and all(
                d["online"] for d in devices.values()
            )

        assert wait_until(online, WAIT), [agent_log(tmp, d) for d in sites.values()]

        def serving(device: str, version: str) -> bool:
            return bool(fleet.devices()[device]["model_version"] == version)

        first = cli("rollout", "start", "--bundle", "demo@1.0.0", "--select", "site=north",
                    "--plan", write_plan(tmp / "plan-1.yaml", 1), "--json", env=env)  # fmt: skip
        completed = f"/rollouts/{json.loads(first)['id']}"
        assert wait_until(lambda: fleet.api(completed)["state"] == "completed", WAIT)
        assert wait_until(lambda: serving(fleet.north, "1.0.0"), WAIT), fleet.devices()
        plan = write_plan(tmp / "plan-2.yaml", 3600)
        second = cli("rollout", "start", "--bundle", "demo@1.1.0", "--select", "site=south",
                     "--plan", plan, "--json", env=env)  # fmt: skip
        assert wait_until(lambda: serving(fleet.south, "1.1.0"), WAIT), fleet.devices()
        yield dataclasses.replace(fleet, rollout=int(json.loads(second)["id"]))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = artefacts_dir(tmp_path_factory.mktemp("screenshots"))
    print(f"\nscreenshots of the pages: {directory}")
    return directory


@contextlib.contextmanager
def signed_in(
    chromium: Browser, fleet: Fleet, role: str, width: int = 1280
) -> Iterator[tuple[Page, Watched]]:
    """A page signed in through the form as `role`; checked clean when the block ends."""
    context = chromium.new_context(viewport={"width": width, "height": 900})
    watched = Watched(fleet.url)
    watched.attach(context)
    try:
        page = context.new_page()
        page.goto(f"{fleet.url}/login")
        page.fill("#token", fleet.tokens[role])
        page.keyboard.press("Enter")
        page.wait_for_url(f"{fleet.url}/")
        yield page, watched
        watched.assert_clean(fleet.tokens[role])
    finally:
        context.close()


def agree(page: Page, shown: Any, expected: Any) -> None:
    """Reload `page` until `shown()` equals `expected()` (both read afresh each time)."""
    seen: list[Any] = []

    def same() -> bool:
        page.reload()
        seen[:] = [shown(), expected()]
        return bool(seen[0] == seen[1])

    assert wait_until(same, WAIT, interval=0.5), f"page {seen[0]!r} != API {seen[1]!r}"


def card_counts(page: Page, card: str) -> dict[str, str]:
    rows: list[list[str]] = page.eval_on_selector_all(
        f"[aria-labelledby={card}] .counts li",
        "items => items.map(li => [li.firstElementChild.textContent.trim(),"
        " li.lastElementChild.textContent.replace(/\\s+/g, ' ').trim()])",
    )
    return dict((label, value) for label, value in rows)


def fact(page: Page, term: str) -> str:
    """The text of the <dd> after the <dt> `term` on the page."""
    return page.locator(
        f"xpath=//dt[normalize-space()='{term}']/following-sibling::dd[1]"
    ).inner_text()


def test_a_request_without_a_session_goes_to_login_and_comes_back_signed_in(
    chromium: Browser, fleet: Fleet
) -> None:
    context = chromium.new_context()
    watched = Watched(fleet.url)
    watched.attach(context)
    try:
        page = context.new_page()
        page.goto(f"{fleet.url}/devices?tag=site%3Dnorth")
        assert page.url.startswith(f"{fleet.url}/login?next=%2Fdevices"), page.url
        assert page.locator("h1").inner_text() == "Sign in"

        page.fill("#token", "efa_not-a-token")
        page.keyboard.press("Enter")
        page.wait_for_load_state()
        assert page.locator("[role=alert]").inner_text().startswith("Not signed in")
        watched.expect_refusal(401, f"{fleet.url}/login")

        page.fill("#token", fleet.tokens["operator"])
        page.click("button:has-text('Sign in')")
        page.wait_for_url(f"{fleet.url}/devices?tag=site%3Dnorth")
        shown = page.locator("table.stack tbody td[data-label=Device]").all_inner_texts()
        assert shown == [fleet.north]
        assert "Signed in as" in page.locator(".signed-in").inner_text()

        [cookie] = context.cookies()
        assert cookie["name"] == "edgefleet_session"
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert fleet.tokens["operator"] not in cookie["value"]

        page.click("text=Log out")
        page.wait_for_url(f"{fleet.url}/login")
        page.goto(f"{fleet.url}/")
        assert page.url.startswith(f"{fleet.url}/login"), page.url
        watched.assert_clean(fleet.tokens["operator"])
    finally:
        context.close()


def test_every_page_loads_without_errors_and_from_the_server_alone(
    chromium: Browser, fleet: Fleet
) -> None:
    paths = [
        "/", "/devices", f"/devices/{fleet.north}", f"/devices/{fleet.south}", "/rollouts",
        f"/rollouts/{fleet.rollout}", "/bundles", "/bundles/demo/1.0.0", "/bundles/demo/1.1.0",
        "/alerts", "/devices?sort=health", "/devices?online=no",
    ]  # fmt: skip
    with signed_in(chromium, fleet, "operator") as (page, _):
        for path in paths:
            response = page.goto(f"{fleet.url}{path}")
            assert response is not None and response.status == 200, path
            assert page.locator("h1").count() == 1, path
        # The API docs: Swagger UI from the server's own files, rendering the API.
        page.goto(f"{fleet.url}/api/v1/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT * 1000)


def test_the_overview_shows_the_figures_the_api_returns(chromium: Browser, fleet: Fleet) -> None:
    def expected() -> dict[str, Any]:
        devices = list(fleet.devices().values())
        online = [d for d in devices if d["online"]]
        versions = Counter(
            f"{d['model_name']}@{d['model_version']}" if d["model_name"] else "no model installed"
            for d in devices
        )
        health = Counter(d["health"] for d in online)
        rollouts = [r for r in fleet.api("/rollouts") if r["state"] in ACTIVE]
        return {
            "devices": str(len(devices)),
            "presence": {"online": str(len(online)), "offline": str(len(devices) - len(online))},
            "versions": {label: str(count) for label, count in versions.items()},
            "health": {state: str(health[state]) for state in (*HEALTH_ORDER, *health)},
            "rollouts": {
                f"#{r['id']} {r['bundle']}": f"{r['state']} stage {r['stage_index'] + 1} of "
                f"{r['stage_count']}"
                for r in rollouts
            },
        }

    def shown(page: Page) -> dict[str, Any]:
        return {
            "devices": page.locator("[aria-labelledby=presence] .figure").inner_text(),
            "presence": card_counts(page, "presence"),
            "versions": card_counts(page, "versions"),
            "health": card_counts(page, "health"),
            "rollouts": card_counts(page, "rollouts"),
        }

    with signed_in(chromium, fleet, "viewer") as (page, _):
        agree(page, lambda: shown(page), expected)
        # Each version links to the device list filtered by it.
        page.click("[aria-labelledby=versions] >> text=demo@1.1.0")
        page.wait_for_url(f"{fleet.url}/devices?model=demo%401.1.0")
        assert page.locator("td[data-label=Device]").all_inner_texts() == [fleet.south]


def test_the_device_list_shows_the_api_devices_and_filters_by_tag_and_version(
    chromium: Browser, fleet: Fleet
) -> None:
    def rows(page: Page) -> list[dict[str, str]]:
        cells: list[dict[str, str]] = page.eval_on_selector_all(
            "table.stack tbody tr",
            "rows => rows.map(tr => Object.fromEntries(Array.from(tr.cells).map("
            "td => [td.dataset.label, (td.querySelector('.state') || td).textContent.trim()])))",
        )
        return [{k: v for k, v in row.items() if k != "Last seen"} for row in cells]

    def from_api(query: str = "") -> list[dict[str, str]]:
        return [
            {
                "Device": d["id"],
                "Online": "online" if d["online"] else "offline",
                "Verdict": d["verdict"]["state"],
                "Model health": d["health"],
                "Model": f"{d['model_name']}@{d['model_version']}" if d["model_name"] else "none",
                "Tags": ", ".join(f"{k}={v}" for k, v in d["tags"].items()) or "-",
            }
            for d in fleet.devices(query).values()
        ]

    with signed_in(chromium, fleet, "viewer") as (page, _):
        page.goto(f"{fleet.url}/devices")
        agree(page, lambda: rows(page), from_api)
        assert {row["Device"] for row in rows(page)} == {fleet.north, fleet.south}

        page.fill("#f-tag", "site=north")
        page.click("button:has-text('Show')")
        page.wait_for_url("**/devices?tag=site%3Dnorth*")
        agree(page, lambda: rows(page), lambda: from_api("&tag=site%3Dnorth"))
        assert [row["Device"] for row in rows(page)] == [fleet.north]

        page.click("text=Clear the filters")
        page.fill("#f-model", "demo@1.1.0")
        page.click("button:has-text('Show')")
        page.wait_for_url("**/devices?*model=demo%401.1.0*")
        agree(page, lambda: rows(page), lambda: from_api("&model=demo%401.1.0"))
        assert [row["Device"] for row in rows(page)] == [fleet.south]

        page.fill("#f-model", "")
        page.fill("#f-tag", "site=nowhere")
        page.click("button:has-text('Show')")
        page.wait_for_url("**/devices?tag=site%3Dnowhere*")
        assert page.locator("#result-count").inner_text().startswith("0 devices")


def test_the_device_page_shows_the_heartbeat_figures_and_the_verdict(
    chromium: Browser, fleet: Fleet
) -> None:
    def from_api() -> dict[str, Any]:
        device = fleet.api(f"/devices/{fleet.north}")
        beat = device["heartbeat"]
        return {
            "verdict": f"Health: {device['verdict']['state']}",
            "reasons": device["verdict"]["reasons"],
            "trust root": f"version {beat['trust_root_version']}",
            "frozen out": "yes" if beat["frozen_out"] else "no",
            "breakers": ", ".join(f"{b['step']}: {b['state']}" for b in beat["breakers"]),
            "link": f"{beat['link']['connects']} connects, "
            f"{beat['link']['disconnects']} connections lost",
            "model": f"demo@{device['model_version']}",
        }

    def shown(page: Page) -> dict[str, Any]:
        return {
            "verdict": page.locator("#health").inner_text(),
            "reasons": page.locator(".verdict-box li").all_inner_texts(),
            "trust root": fact(page, "Trust root"),
            "frozen out": fact(page, "Frozen out"),
            "breakers": fact(page, "Fallback breakers"),
            "link": ", ".join(fact(page, "MQTT link").split(", ")[:2]),
            "model": fact(page, "In service"),
        }

    with signed_in(chromium, fleet, "viewer") as (page, _):
        page.goto(f"{fleet.url}/devices/{quote(fleet.north)}")
        agree(page, lambda: shown(page), from_api)
        # The heartbeat history as charts, each with its figures in words: CPU as the API has it.
        agree(page, lambda: cpu_chart(page), lambda: cpu_history(fleet, fleet.north))


def cpu_chart(page: Page) -> tuple[str, str, str]:
    caption = page.locator(".chart-caption").first.inner_text()
    found = re.match(r"CPU \(average\): latest (\S+) %, highest (\S+) %, (\d+) samples?", caption)
    assert found, caption
    latest, highest, samples = found.groups()
    return latest, highest, samples


def cpu_history(fleet: Fleet, device: str) -> tuple[str, str, str]:
    points = fleet.api(f"/devices/{device}/history")["points"]
    cpu = [point["cpu_avg"] for point in points if point["cpu_avg"] is not None]
    return (f"{cpu[-1]:.3g}", f"{max(cpu):.3g}", str(len(cpu))) if cpu else ("", "", "0")


def test_diagnostics_asked_from_the_device_page_come_back_from_the_agent(
    chromium: Browser, fleet: Fleet
) -> None:
    with signed_in(chromium, fleet, "operator") as (page, _):
        page.goto(f"{fleet.url}/devices/{quote(fleet.south)}")
        page.click("button:has-text('Ask the device for its log and status')")
        page.wait_for_url(f"{fleet.url}/devices/{quote(fleet.south)}*")
        latest = page.locator("article.diagnostics").first

        def answered() -> bool:
            page.reload()
            return latest.locator("p").first.inner_text().startswith("Answered ")

        assert wait_until(answered, WAIT, interval=1.0), latest.inner_text()
        assert "by web-operator" in latest.locator("h3").inner_text()
        log = latest.locator("pre.log").first.inner_text()
        assert f"agent {fleet.south} serving on" in log, log
        latest.locator("summary").click()
        assert f'"device_id": "{fleet.south}"' in latest.locator("details pre").inner_text()
        [request, *_] = fleet.api(f"/devices/{fleet.south}/diagnostics")["items"]
        assert request["state"] == "answered" and request["requested_by"] == "web-operator"


def test_a_viewer_sees_no_action_and_cannot_act(chromium: Browser, fleet: Fleet) -> None:
    with signed_in(chromium, fleet, "viewer") as (page, watched):
        page.goto(f"{fleet.url}/rollouts/{fleet.rollout}")
        assert page.locator("main button").count() == 0
        assert page.locator("main form").count() == 0
        page.goto(f"{fleet.url}/devices/{quote(fleet.south)}")
        assert page.locator("main button").count() == 0
        # The form as an operator's page has it, sent with the viewer's own CSRF token.
        status = page.evaluate(
            """async (path) => {
                const body = new URLSearchParams({
                    csrf_token: document.querySelector('input[name=csrf_token]').value,
                    reason: 'a viewer tries'});
                return (await fetch(path, {method: 'POST', body})).status;
            }""",
            f"/rollouts/{fleet.rollout}/pause",
        )
        assert status == 403
        watched.expect_refusal(403, f"{fleet.url}/rollouts/{fleet.rollout}/pause")
    assert fleet.api(f"/rollouts/{fleet.rollout}")["state"] == "running"


def test_pages_at_phone_and_laptop_width_have_no_sideways_scroll(
    chromium: Browser, fleet: Fleet, screenshots: Path
) -> None:
    pages = {
        "overview": "/",
        "devices": "/devices",
        "device": f"/devices/{quote(fleet.south)}",
        "rollout": f"/rollouts/{fleet.rollout}",
    }
    for width in WIDTHS:
        with signed_in(chromium, fleet, "operator", width=width) as (page, _):
            for name, path in pages.items():
                page.goto(f"{fleet.url}{path}")
                scroll = page.evaluate("document.documentElement.scrollWidth")
                assert scroll <= width, f"{name} at {width} px is {scroll} px wide"
                # Nor inside the page: these pages' tables fit a phone (wide ones stack).
                if width < 768:
                    wide = page.eval_on_selector_all(*SCROLLING_TABLES)
                    assert wide == 0, f"{name}: {wide} tables scroll sideways at {width} px"
                page.screenshot(path=screenshots / f"{name}-{width}.png", full_page=True)
            page.goto(f"{fleet.url}/devices")
            assert not overlapping(page, ".filters input, .filters select, .filters button")
    assert len(list(screenshots.glob("*.png"))) >= len(pages) * len(WIDTHS)


SCROLLING_TABLES = (
    ".table-wrap",
    "wraps => wraps.filter(w => w.scrollWidth > w.clientWidth).length",
)


def overlapping(page: Page, selector: str) -> list[tuple[str, str]]:
    """Pairs of the controls matching `selector` whose boxes overlap (by names)."""
    boxes: list[tuple[str, float, float, float, float]] = page.eval_on_selector_all(
        selector,
        "found => found.map(e => { const r = e.getBoundingClientRect();"
        " return [e.name || e.textContent.trim(), r.left, r.top, r.right, r.bottom]; })",
    )
    return [
        (a[0], b[0])
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if a[1] < b[3] - 1 and b[1] < a[3] - 1 and a[2] < b[4] - 1 and b[2] < a[4] - 1
    ]


def test_an_operator_pauses_resumes_and_aborts_from_the_rollout_page(
    chromium: Browser, fleet: Fleet
) -> None:
    def state() -> str:
        return str(fleet.api(f"/rollouts/{fleet.rollout}")["state"])

    with signed_in(chromium, fleet, "operator") as (page, _):
        page.goto(f"{fleet.url}/rollouts/{fleet.rollout}")
        # Pause from the keyboard alone: Tab to the button, Enter.
        for _ in range(60):
            page.keyboard.press("Tab")
            focused = page.evaluate("document.activeElement.textContent.trim()")
            if focused == "Pause the rollout":
                break
        else:
            pytest.fail("Tab never reached the Pause button")
        page.keyboard.press("Enter")
        page.wait_for_selector("button:has-text('Resume the rollout')")
        assert fact(page, "State").startswith("paused")
        assert state() == "paused"

        page.click("button:has-text('Resume the rollout')")
        page.wait_for_selector("button:has-text('Pause the rollout')")
        assert state() == "running"

        page.fill("input[required][name=reason]", "stopped from the page")
        page.click("button:has-text('Abort the rollout')")
        page.wait_for_selector("text=takes no action")
        assert wait_until(lambda: state() == "aborted", WAIT), state()
        transitions = fleet.api(f"/rollouts/{fleet.rollout}")["transitions"]
        assert [t["actor"] for t in transitions][-4:-1] == ["web-operator"] * 3, transitions
        assert "stopped from the page" in {t["reason"] for t in transitions}


def test_a_device_gone_offline_reads_offline_with_its_reason(
    chromium: Browser, fleet: Fleet, screenshots: Path
) -> None:
    stop_agent(fleet.agents[fleet.north])
    assert wait_until(lambda: not fleet.devices()[fleet.north]["online"], WAIT), fleet.devices()

    def from_api() -> tuple[str, list[str]]:
        verdict = fleet.api(f"/devices/{fleet.north}")["verdict"]
        return f"Health: {verdict['state']}", verdict["reasons"]

    for width in WIDTHS:
        with signed_in(chromium, fleet, "viewer", width=width) as (page, _):
            page.goto(f"{fleet.url}/devices?online=no")
            assert page.locator("td[data-label=Device]").all_inner_texts() == [fleet.north]
            page.click(f"text={fleet.north}")
            page.wait_for_url(f"{fleet.url}/devices/{quote(fleet.north)}")
            agree(
                page,
                lambda: (
                    page.locator("#health").inner_text(),
                    page.locator(".verdict-box li").all_inner_texts(),
                ),
                from_api,
            )
            assert page.locator("#health").inner_text() == "Health: offline"
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.screenshot(path=screenshots / f"device-offline-{width}.png", full_page=True)
