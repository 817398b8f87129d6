"""The rollout pages: what they show, and pause/resume/abort from them (operators only)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from edgefleet.server.db.models import AuditEntry, Rollout, RolloutState, RolloutTransition
from edgefleet.server.principals import Role
from edgefleet.server.rollouts import stagetelemetry
from edgefleet.timefmt import utcnow
from tests.server.apiclient import Api
from tests.web.conftest import sign_in

PLAN = {"stages": [{"percent": 50, "gates": {"max_failure_share": 0.25}}, {"percent": 100}]}


@pytest.fixture
def rollout(web: Api, bundle_file: Path) -> int:
    """A running rollout of demo@1.2.3 to four devices, in two stages."""
    assert web.push(bundle_file).status_code == 201
    for n in range(4):
        assert web.enroll(f"dev-{n}").status_code == 201
    response = web.post(
        "/rollouts", Role.OPERATOR, json={"bundle": "demo@1.2.3", "select": "", "plan": PLAN}
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def state_of(web: Api, rollout_id: int) -> RolloutState:
    with web.context.db.session() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        return rollout.state


def test_the_list_and_the_page_show_stages_gates_devices_and_transitions(
    web: Api, rollout: int
) -> None:
    browser, _ = sign_in(web, Role.VIEWER)
    listing = browser.get("/rollouts")
    assert listing.status_code == 200
    assert f'href="/rollouts/{rollout}"' in listing.text and "demo@1.2.3" in listing.text

    page = browser.get(f"/rollouts/{rollout}")
    assert page.status_code == 200
    text = page.text
    assert "<h3>Stage 1 (current)</h3>" in text and "<h3>Stage 2</h3>" in text
    # the gate with the plan's threshold, in words beside its result
    assert "max failure share" in text and "at most 0.25" in text
    assert "not judged yet" in text or "passed" in text
    stage_devices = web.get(f"/rollouts/{rollout}").json()["stages"][0]["assigned"]
    assert text.count('href="/devices/dev-') == stage_devices == 2
    assert "created → running" in text
    assert "Pause the rollout" not in text  # a viewer sees no button


def test_an_operator_pauses_resumes_and_aborts_and_each_is_audited(web: Api, rollout: int) -> None:
    browser, csrf = sign_in(web, Role.OPERATOR)
    page = browser.get(f"/rollouts/{rollout}").text
    assert "Pause the rollout" in page and "Abort the rollout" in page

    paused = browser.post(
        f"/rollouts/{rollout}/pause", data={"csrf_token": csrf, "reason": "checking line 3"}
    )
    assert paused.status_code == 303 and paused.headers["location"] == f"/rollouts/{rollout}"
    assert state_of(web, rollout) is RolloutState.PAUSED
    assert "Resume the rollout" in browser.get(f"/rollouts/{rollout}").text

    assert browser.post(f"/rollouts/{rollout}/resume", data={"csrf_token": csrf}).status_code == 303
    assert state_of(web, rollout) is RolloutState.RUNNING

    unexplained = browser.post(f"/rollouts/{rollout}/abort", data={"csrf_token": csrf})
    assert unexplained.status_code == 400 and "say why" in unexplained.text
    assert state_of(web, rollout) is RolloutState.RUNNING

    aborted = browser.post(
        f"/rollouts/{rollout}/abort", data={"csrf_token": csrf, "reason": "bad on line 3"}
    )
    assert aborted.status_code == 303
    assert state_of(web, rollout) is RolloutState.ABORTING
    with web.context.db.session() as session:
        audit = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
        reasons = session.scalars(
            select(RolloutTransition.reason).order_by(RolloutTransition.id)
        ).all()
    moves = [
        (a.action, a.role, a.details.get("reason")) for a in audit if a.action != "rollout.start"
    ]
    assert [m for m in moves if m[0].startswith("rollout.")] == [
        ("rollout.pause", "operator", "checking line 3"),
        ("rollout.resume", "operator", f"resume by {audit[-1].actor}"),
        ("rollout.abort", "operator", "bad on line 3"),
    ]
    assert reasons[-1] == "bad on line 3"

    # the state no longer allows a pause: refused in words, nothing changes
    again = browser.post(f"/rollouts/{rollout}/pause", data={"csrf_token": csrf})
    assert again.status_code == 409
    assert state_of(web, rollout) is RolloutState.ABORTING


def test_a_viewer_post_and_a_post_without_csrf_are_403_and_change_nothing(
    web: Api, rollout: int
) -> None:
    viewer, viewer_csrf = sign_in(web, Role.VIEWER)
    refused = viewer.post(f"/rollouts/{rollout}/pause", data={"csrf_token": viewer_csrf})
    assert refused.status_code == 403 and "viewer role" in refused.text

    operator, _ = sign_in(web, Role.OPERATOR)
    assert operator.post(f"/rollouts/{rollout}/abort", data={"reason": "x"}).status_code == 403
    assert (
        operator.post(
            f"/rollouts/{rollout}/abort", data={"reason": "x", "csrf_token": "forged"}
        ).status_code
        == 403
    )
    assert state_of(web, rollout) is RolloutState.RUNNING


def test_unknown_rollouts_are_404_pages(web: Api) -> None:
    browser, csrf = sign_in(web, Role.OPERATOR)
    page = browser.get("/rollouts/999")
    assert page.status_code == 404 and "no rollout 999" in page.text
    assert browser.post("/rollouts/999/pause", data={"csrf_token": csrf}).status_code == 404
    assert browser.get("/rollouts/0").status_code == 422


def test_a_verdict_on_a_kept_reading_says_how_old_its_telemetry_is(
    web: Api, rollout: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read as a large stage's: a second kept per row (2 devices, 2 spans each: 4 s).
    monkeypatch.setattr(stagetelemetry, "ROWS_PER_SECOND", 1)
    now = utcnow()
    monkeypatch.setattr(web.context, "clock", lambda: now)
    assert web.get(f"/rollouts/{rollout}").json()["stages"][0]["telemetry_age_s"] == 0
    monkeypatch.setattr(web.context, "clock", lambda: now + dt.timedelta(seconds=3))
    assert web.get(f"/rollouts/{rollout}").json()["stages"][0]["telemetry_age_s"] == 3
    browser, _ = sign_in(web, Role.VIEWER)
    assert "(on telemetry read 3 s ago)" in browser.get(f"/rollouts/{rollout}").text
