"""The device page: it shows what the database holds of one device, and diagnostics on request."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from sqlalchemy import select

from edgefleet.server.db.models import (
    AuditEntry,
    DeadLetterRow,
    Device,
    DiagnosticsRequest,
    DriftState,
    HeartbeatSample,
    PresenceChange,
    StatusReportRow,
    TelemetryBucket,
)
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.principals import Role
from tests.conftest import KeySet
from tests.server.apiclient import Api
from tests.server.test_accuracy import converter_report
from tests.server.test_accuracy_api import write_bundle
from tests.web.conftest import sign_in
from tests.web.test_alert_pages import add_alert

GIB = 1024**3
BOUNDS = [1.0, 2.0, 5.0, 10.0, 20.0]


def bucket(
    device_id: str, version: str, start: dt.datetime, latency: list[int], **counts: int
) -> TelemetryBucket:
    return TelemetryBucket(
        device_id=device_id,
        bundle_name="demo",
        bundle_version=version,
        bucket_start=start,
        windows=counts.pop("windows", 1),
        latency={"bounds_ms": BOUNDS, "counts": latency},
        bins={},
        **counts,
    )


def drift_state(
    feature: str,
    window_end: dt.datetime,
    statistic: float,
    threshold: float,
    drifted: bool | None = None,
) -> DriftState:
    """dev-1's last verdict on one feature of demo@2.0.0 (`drifted` None: not kept)."""
    return DriftState(
        scope="device",
        subject="dev-1",
        bundle_name="demo",
        bundle_version="2.0.0",
        kind="feature-drift",
        feature=feature,
        persistence={},
        window_end=window_end,
        statistic=statistic,
        threshold=threshold,
        drifted=drifted,
    )


def sick_device(web: Api, tmp_path: Path, keyset: KeySet) -> None:
    """dev-1 runs demo@2.0.0 after 1.0.0: slower, more fallbacks, a feature drifting."""
    for version, accuracy in (("1.0.0", 95.0), ("2.0.0", 93.5)):
        report = converter_report(accuracy)
        assert web.push(write_bundle(tmp_path, keyset, version, report)).status_code == 201
    assert web.enroll("dev-1", tags={"site": "plant-7"}).status_code == 201
    now = web.clock()
    with web.context.db.session() as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.online, device.last_seen = True, now
        device.model_name, device.model_version, device.previous_version = "demo", "2.0.0", "1.0.0"
        device.install_state, device.security_floors = "committed", {"demo": 3}
        device.heartbeat = {
            "sent_at": now.isoformat(),
            "uptime_s": 3600,
            "cpu_percent": 40.0,
            "memory_used_bytes": 2 * GIB,
            "memory_total_bytes": 4 * GIB,
            "disk_free_bytes": 10 * GIB,
            "disk_total_bytes": 32 * GIB,
            "temperature_c": 61.5,
            "link": {
                "connects": 4,
                "disconnects": 3,
                "publish_failures": 2,
                "outbox_depth": 17,
                "last_problem": "broker unreachable",
            },
            "breakers": [
                {"step": "primary", "state": "open"},
                {"step": "float", "state": "closed"},
            ],
            "trust_root_version": 2,
            "frozen_out": True,
            "frozen_reason": "fleet timestamp expired 2 h ago",
        }
        start = now - dt.timedelta(hours=3)
        session.add_all(
            [
                bucket(
                    "dev-1",
                    "1.0.0",
                    start,
                    requests=1000,
                    errors=1,
                    fallbacks=10,
                    latency=[0, 500, 500, 0, 0, 0],
                ),
                bucket(
                    "dev-1",
                    "2.0.0",
                    start + dt.timedelta(hours=1),
                    requests=400,
                    errors=8,
                    fallbacks=40,
                    shadow_requests=200,
                    shadow_agreements=190,
                    labelled_count=100,
                    labelled_correct=87,
                    latency=[0, 0, 0, 300, 100, 0],
                ),
                drift_state("pixels[53]", now, statistic=31.5, threshold=12.25),
                drift_state("pixels[7]", now, statistic=3.5, threshold=12.0, drifted=False),
                # drifting by its values outside the reference's range
                drift_state("pixels[9]", now, statistic=2.5, threshold=12.0, drifted=True),
                StatusReportRow(
                    device_id="dev-1",
                    sequence=5,
                    received_at=now - dt.timedelta(hours=1),
                    sent_at=now - dt.timedelta(hours=1),
                    install_state="committed",
                    bundle_name="demo",
                    bundle_version="2.0.0",
                    directive_sequence=9,
                    reason="health check passed on 50 requests",
                ),
                PresenceChange(
                    device_id="dev-1",
                    at=now - dt.timedelta(hours=5),
                    online=False,
                    reason="last will: the connection dropped",
                ),
            ]
        )
        for minutes, cpu in ((120, 20.0), (60, 55.0), (1, 91.0)):
            session.add(
                HeartbeatSample(
                    device_id="dev-1",
                    slot_start=now - dt.timedelta(minutes=minutes),
                    resolution_s=60,
                    samples=1,
                    cpu_sum=cpu,
                    cpu_max=cpu,
                    memory_used_sum=2.0 * GIB,
                    memory_total=4 * GIB,
                    disk_free_min=10 * GIB,
                    disk_total=32 * GIB,
                    temperature_samples=1,
                    temperature_sum=61.5,
                    temperature_max=61.5,
                )
            )
        session.add(
            DeadLetterRow(
                device_id="dev-1",
                at=now - dt.timedelta(minutes=30),
                error="database error: DataError: value out of range for type bigint",
                dropped={"status": 0, "heartbeat": 1, "telemetry": 2, "diagnostics": 0},
                messages=[],
            )
        )
    add_alert(web, "dev-1", "feature-drift", "pixels[53]", resolved=False, version="2.0.0")
    # an alert of the previous version lends its evidence to no check of the version in service
    add_alert(web, "dev-1", "feature-drift", "pixels[7]", resolved=False)


def test_the_device_page_shows_what_the_database_holds(
    web: Api, tmp_path: Path, keyset: KeySet
) -> None:
    sick_device(web, tmp_path, keyset)
    browser, _ = sign_in(web, Role.VIEWER)
    page = browser.get("/devices/dev-1")
    assert page.status_code == 200, page.text
    text = page.text
    # the verdict and why
    assert "Health: degraded" in text
    assert "breaker open on fallback step primary" in text
    assert "frozen out: fleet timestamp expired 2 h ago" in text
    # identity, model in service and previous
    assert "site=plant-7" in text and "x86_64" in text
    assert 'href="/bundles/demo/2.0.0">demo@2.0.0</a>' in text
    assert 'href="/bundles/demo/1.0.0">demo@1.0.0</a>' in text
    # what the agent reported
    assert "version 2" in text and "demo: release 3" in text and "device up 1 h 0 min" in text
    # every time on the page reads alike: the heartbeat's too (the device sent ISO text)
    sent = re.search(r"<dt>Heartbeat sent</dt><dd>([^<,]+)", text)
    assert sent and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", sent[1]), sent
    assert "3 connections lost, 2 failed publishes, 17 messages waiting" in text
    assert "last problem: broker unreachable" in text
    assert "primary: open, float: closed" in text
    # heartbeat charts, with their figures in words
    assert text.count('<svg class="chart"') == 4
    assert "CPU (average): latest 91 %, highest 91 %, 3 samples" in text
    assert "Temperature (highest): latest 61.5 °C" in text
    # the model's figures per version, against the previous one
    assert "2.0.0 (in service)" in text and "1.0.0 (previous)" in text
    assert "8 (2%)" in text and "40 (10%)" in text  # errors and fallbacks of 400 requests
    assert "1 (0.1%)" in text and "10 (1%)" in text  # of the previous version's 1000
    assert "10 ms / 20 ms" in text and "2 ms / 5 ms" in text  # latency p50 / p95
    assert "95% of 200 compared" in text  # shadow agreement
    assert "87% of 100 labelled" in text and "93.5% at conversion" in text
    # drift per feature against its threshold, drifting first, with the alert's PSI
    drift = text[text.index('id="drift"') :]
    assert drift.index("pixels[53]") < drift.index("pixels[9]") < drift.index("pixels[7]")
    assert "31.5 / 12.2" in text and text.count("PSI 0.42") == 1
    # pixels[9] drifts by its values outside the reference's range, under its threshold
    assert text.count(">drift</span>") == 2 and text.count(">ok</span>") == 1
    # open alerts, install history in words, online history
    assert "feature drift of pixels[53] on demo@2.0.0" in text
    assert "installed and serving (demo@2.0.0): health check passed on 50 requests" in text
    assert "offline: last will: the connection dropped" in text
    # what the database refused of it, kept
    assert "Messages set aside" in text
    assert (
        "30 min ago: 1 heartbeat, 2 telemetry; the database refused them: database error: "
        "DataError: value out of range for type bigint"
    ) in text
    assert "No diagnostics asked for yet." in text
    assert "Ask the device" not in text  # a viewer has no button


def test_a_device_with_no_model_is_no_model_not_ok(web: Api) -> None:
    """Online, heartbeats fine, but nothing installed: it refuses every prediction."""
    assert web.enroll("bare-1").status_code == 201
    now = web.clock()
    with web.context.db.session() as session:
        device = session.get(Device, "bare-1")
        assert device is not None
        device.online, device.last_seen, device.install_state = True, now, "idle"
        device.heartbeat = {
            "sent_at": now.isoformat(),
            "disk_free_bytes": 10 * GIB,
            "disk_total_bytes": 32 * GIB,
            "install_state": "idle",
        }
    browser, _ = sign_in(web, Role.VIEWER)
    text = browser.get("/devices/bare-1").text
    assert "Health: no-model" in text and "Nothing wrong found" not in text
    assert "no model installed: the device refuses every prediction until one is" in text
    assert 'class="verdict-box verdict-no-model"' in text
    listed = browser.get("/devices").text
    assert '<span class="state state-no-model">no-model</span>' in listed


def test_unknown_devices_are_404_pages(web: Api) -> None:
    browser, csrf = sign_in(web, Role.OPERATOR)
    for device_id in ("nope", "bad%20id"):
        page = browser.get(f"/devices/{device_id}")
        assert page.status_code == 404 and "there is no device" in page.text
    assert browser.post("/devices/nope/diagnostics", data={"csrf_token": csrf}).status_code == 404


def test_an_operator_asks_for_diagnostics_and_sees_the_answer(
    web: Api, tmp_path: Path, keyset: KeySet
) -> None:
    web.context.issuer = DirectiveIssuer([keyset.server], web.context.settings, clock=web.clock)
    assert web.enroll("dev-1").status_code == 201
    viewer, viewer_csrf = sign_in(web, Role.VIEWER)
    refused = viewer.post("/devices/dev-1/diagnostics", data={"csrf_token": viewer_csrf})
    assert refused.status_code == 403
    operator, csrf = sign_in(web, Role.OPERATOR)
    assert operator.post("/devices/dev-1/diagnostics").status_code == 403  # no CSRF token
    fresh = operator.get("/devices/dev-1").text
    assert "Ask the device for its log and status" in fresh
    assert "Messages set aside" not in fresh  # shown only when the database refused some

    asked = operator.post("/devices/dev-1/diagnostics", data={"csrf_token": csrf})
    assert asked.status_code == 303 and asked.headers["location"] == "/devices/dev-1#diagnostics"
    topics = [topic for topic, *_ in web.publisher.calls]
    assert len(topics) == 1 and "dev-1" in topics[0]
    assert "Waiting for the device" in operator.get("/devices/dev-1").text

    with web.context.db.session() as session:
        request = session.scalars(select(DiagnosticsRequest)).one()
        request.answered_at = web.clock()
        request.result = {
            "log_lines": [
                {
                    "at": "2026-01-01T00:00:00Z",
                    "level": "ERROR",
                    "logger": "agent.link",
                    "message": "<broker> gone",
                },
                {  # the agent sends its lines oldest first
                    "at": "2026-01-01T00:00:05Z",
                    "level": "INFO",
                    "logger": "agent.link",
                    "message": "connected again",
                },
            ],
            "status": {"install": {"state": "committed"}},
        }
        audit = session.scalars(select(AuditEntry.action)).all()
    assert "device.diagnose" in audit
    text = operator.get("/devices/dev-1").text
    assert "ERROR agent.link: &lt;broker&gt; gone" in text  # escaped, in the <pre>
    # newest first, where a box that scrolls shows it without scrolling; and said so
    assert "Its last 2 log lines, newest first." in text
    newest = text.index("INFO agent.link: connected again")
    assert newest < text.index("ERROR agent.link: &lt;broker&gt; gone")
    assert json.dumps({"state": "committed"}, indent=2).splitlines()[1].strip() in text
