"""The pages' layout in headless Chromium, against the app served by uvicorn on a real
database (no agents): what only a browser shows, such as a box's height on a phone."""

from __future__ import annotations

from playwright.sync_api import Browser

from edgefleet.server.db.models import Device
from edgefleet.server.principals import Role
from tests.server.apiclient import Api, serve

GIB = 1024**3


def sick_and_chatty(web: Api) -> None:
    """dev-1 online, degraded for four reasons: a verdict reason of several lines at 390 px."""
    assert web.enroll("dev-1").status_code == 201
    now = web.clock()
    with web.context.db.session() as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.online, device.last_seen = True, now
        device.model_name, device.model_version, device.install_state = "demo", "1.0.0", "committed"
        device.heartbeat = {
            "sent_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "disk_free_bytes": 1 * GIB,
            "disk_total_bytes": 32 * GIB,
            "temperature_c": 91.0,
            "frozen_out": True,
            "frozen_reason": "its newest fleet timestamp expired 3 h ago and none newer came",
            "breakers": [{"step": "primary", "state": "open"}],
        }


def test_a_verdict_badge_keeps_its_height_beside_a_long_reason_at_390_px(
    chromium: Browser, web: Api
) -> None:
    sick_and_chatty(web)
    with serve(web) as url:
        context = chromium.new_context(viewport={"width": 390, "height": 844})
        try:
            page = context.new_page()
            page.goto(f"{url}/login")
            page.fill("input[name=token]", web.tokens[Role.VIEWER])
            page.press("input[name=token]", "Enter")
            page.wait_for_url(f"{url}/")
            page.goto(f"{url}/devices")
            verdict = page.locator("td[data-label=Verdict]")
            badge = verdict.locator(".state").bounding_box()
            reason = verdict.locator(".reason").bounding_box()
            online = page.locator("td[data-label=Online] .state").bounding_box()
            assert badge and reason and online
            assert reason["height"] > 2 * online["height"]  # the reason does wrap here
            # the badge is as tall as any one-line badge, not the reason's height
            assert abs(badge["height"] - online["height"]) <= 1, (badge, online)
        finally:
            context.close()
