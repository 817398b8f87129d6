"""The one health verdict: each reason on its own, its facts from a real database, the
API that carries it (and a device's history), and `edgefleet devices health` / `show`
against the real app served by uvicorn."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    Alert,
    Device,
    PresenceChange,
    StatusReportRow,
    TelemetryBucket,
)
from edgefleet.server.history import (
    NO_MODEL,
    HeartbeatSlot,
    VerdictFacts,
    device_health_verdict,
    merge_heartbeat_slots,
)
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.server.apiclient import Api, make_api, serve

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def beat(**fields: Any) -> dict[str, Any]:
    """A stored heartbeat (as ingestion keeps it) of a healthy device."""
    values: dict[str, Any] = {
        "sent_at": "2026-12-01T11:59:50Z",
        "uptime_s": 100,
        "cpu_percent": 12.5,
        "memory_used_bytes": 512 * 1024**2,
        "memory_total_bytes": 2 * 1024**3,
        "disk_free_bytes": 20 * 1024**3,
        "disk_total_bytes": 32 * 1024**3,
        "temperature_c": 48.0,
        "agent_version": "0.2.0",
        "install_state": "committed",
        "link": {"connects": 2, "disconnects": 1, "publish_failures": 0, "outbox_depth": 3},
        "breakers": [{"step": "primary", "state": "closed"}],
        "trust_root_version": 1,
        "frozen_out": False,
    }
    values.update(fields)
    return values


def device(device_id: str = "cam-1", **fields: Any) -> Device:
    values: dict[str, Any] = {
        "id": device_id,
        "public_key": "00" * 32,
        "enrolled_at": NOW - dt.timedelta(days=3),
        "profile": "x86_64-avx2",
        "arch": "x86_64",
        "runtimes": ["onnxruntime"],
        "agent_version": "0.2.0",
        "tags": {},
        "online": True,
        "last_seen": NOW - dt.timedelta(seconds=10),
        "health": "ok",
        "heartbeat": beat(),
        "model_name": "demo",
        "model_version": "1.0.0",
        "status_sequence": 0,
        "directive_sequence": 0,
    }
    values.update(fields)
    return Device(**values)


def verdict(dev: Device, facts: VerdictFacts | None = None) -> tuple[str, list[str]]:
    found = device_health_verdict(dev, NOW, facts or VerdictFacts())
    return found.state, found.reasons


def test_a_healthy_device_is_ok_without_reasons() -> None:
    assert verdict(device()) == ("ok", [])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"online": False, "last_seen": NOW - dt.timedelta(hours=3, minutes=12)},
            ("offline", ["offline, last seen 3 h 12 min ago"]),
        ),
        ({"online": False, "last_seen": None}, ("unknown", ["never connected"])),
        ({"heartbeat": None}, ("unknown", ["no heartbeat received yet"])),
        ({"model_name": None, "model_version": None}, ("no-model", [NO_MODEL])),
        (
            {"health": "failing"},
            ("failing", ["model failing in the hour before its last telemetry window"]),
        ),
        (
            {"health": "degraded"},
            ("degraded", ["model degraded in the hour before its last telemetry window"]),
        ),
        (
            {"heartbeat": beat(frozen_out=True, frozen_reason="timestamp expired at noon")},
            ("degraded", ["frozen out: timestamp expired at noon"]),
        ),
        (
            {"heartbeat": beat(breakers=[{"step": "primary", "state": "open"}])},
            ("degraded", ["breaker open on fallback step primary"]),
        ),
        (
            {"heartbeat": beat(disk_free_bytes=1 * 1024**3, disk_total_bytes=32 * 1024**3)},
            ("degraded", ["disk almost full: 3.1% free"]),
        ),
        (
            {"heartbeat": beat(temperature_c=85.0)},
            ("degraded", ["hot: 85.0 °C (limit 85 °C)"]),
        ),
    ],
)
def test_each_reason_of_the_row(fields: dict[str, Any], expected: tuple[str, list[str]]) -> None:
    assert verdict(device(**fields)) == expected


def test_a_device_with_no_model_is_never_ok() -> None:
    """It answers its /v1/health "no-model" and refuses predictions: its own state, worse
    than degraded, not as bad as a failing model or offline."""
    bare: dict[str, Any] = {"model_name": None, "model_version": None, "health": "unknown"}
    assert verdict(device(**bare)) == ("no-model", [NO_MODEL])
    hot = device(**bare, heartbeat=beat(temperature_c=90.0))
    assert verdict(hot) == ("no-model", [NO_MODEL, "hot: 90.0 °C (limit 85 °C)"])
    gone = device(**bare, online=False, last_seen=NOW - dt.timedelta(minutes=5))
    assert verdict(gone) == ("offline", ["offline, last seen 5 min ago", NO_MODEL])
    # no heartbeat yet: nothing is known of its model
    assert verdict(device(**bare, heartbeat=None))[0] == "unknown"


def test_offline_outranks_and_keeps_the_other_reasons() -> None:
    dev = device(online=False, health="failing", heartbeat=beat(temperature_c=90.0), last_seen=NOW)
    state, reasons = verdict(dev, VerdictFacts(requests=100, errors=30, fallbacks=2))
    assert state == "offline"
    assert reasons == [
        "offline, last seen 0 s ago",
        "model failing: 30% errors, 2% fallbacks over the last hour (100 requests)",
        "hot: 90.0 °C (limit 85 °C)",
    ]


def _seed(db: Database) -> None:
    """cam-1 healthy; cam-2 with an open alert, a refused install and 30% errors."""
    with db.session() as session:
        session.add_all([device("cam-1"), device("cam-2", health="failing")])
        session.flush()
        session.add_all(
            [
                Alert(
                    kind="feature-drift",
                    scope="device",
                    device_id="cam-2",
                    bundle_name="demo",
                    bundle_version="1.0.0",
                    feature="pixels[3]",
                    opened_at=NOW - dt.timedelta(hours=1),
                    evidence={},
                ),
                Alert(  # resolved: not counted
                    kind="accuracy-drop",
                    scope="device",
                    device_id="cam-2",
                    bundle_name="demo",
                    bundle_version="1.0.0",
                    opened_at=NOW - dt.timedelta(hours=5),
                    resolved_at=NOW - dt.timedelta(hours=4),
                    evidence={},
                ),
                StatusReportRow(
                    device_id="cam-2",
                    sequence=1,
                    received_at=NOW - dt.timedelta(hours=2),
                    sent_at=NOW - dt.timedelta(hours=2),
                    install_state="refused",
                    bundle_name="demo",
                    bundle_version="1.1.0",
                    reason="bundle signature does not verify",
                ),
                StatusReportRow(  # an older failure, superseded by the refusal
                    device_id="cam-2",
                    sequence=0,
                    received_at=NOW - dt.timedelta(hours=3),
                    sent_at=NOW - dt.timedelta(hours=3),
                    install_state="committed",
                    bundle_name="demo",
                    bundle_version="1.0.0",
                ),
                TelemetryBucket(
                    device_id="cam-2",
                    bundle_name="demo",
                    bundle_version="1.0.0",
                    bucket_start=NOW - dt.timedelta(minutes=30),
                    windows=5,
                    requests=200,
                    errors=60,
                    fallbacks=0,
                    schema_violations=0,
                    dropped_windows=0,
                    shadow_requests=0,
                    shadow_agreements=0,
                    labelled_count=0,
                    labelled_correct=0,
                    latency={},
                    bins={},
                ),
                PresenceChange(
                    device_id="cam-2",
                    at=NOW - dt.timedelta(hours=1),
                    online=True,
                    reason="connected",
                ),
            ]
        )
        slot = HeartbeatSlot(
            samples=2,
            cpu_sum=30.0,
            cpu_max=20.0,
            memory_used_sum=200.0,
            memory_total=1000,
            disk_free_min=50,
            disk_total=100,
        )
        merge_heartbeat_slots(
            session, {("cam-2", NOW - dt.timedelta(minutes=10)): slot}, lock=not db.is_sqlite
        )


CAM_2_REASONS = [
    "model failing: 30% errors, 0% fallbacks over the last hour (200 requests)",
    "install of demo@1.1.0 was refused 2 h 0 min ago: bundle signature does not verify",
    "1 open alert: feature-drift (pixels[3])",
]


def test_the_facts_come_from_the_database(database: Database) -> None:
    _seed(database)
    with database.session() as session:
        cam_2 = session.get(Device, "cam-2")
        assert cam_2 is not None
        found = device_health_verdict(cam_2, NOW)  # facts loaded through its session
    assert (found.state, found.reasons) == ("failing", CAM_2_REASONS)


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    _seed(sqlite_database)
    api = make_api(sqlite_database, tmp_path, trust)
    api.clock.now = NOW
    return api


def test_the_api_carries_the_verdict_in_lists_and_detail(api: Api) -> None:
    listed = api.get("/devices", Role.VIEWER).json()["items"]
    assert [(d["id"], d["verdict"]["state"]) for d in listed] == [
        ("cam-1", "ok"),
        ("cam-2", "failing"),
    ]
    one = api.get("/devices/cam-2", Role.VIEWER).json()
    assert one["verdict"] == {"state": "failing", "reasons": CAM_2_REASONS}
    assert one["heartbeat"]["link"]["outbox_depth"] == 3
    assert one["heartbeat"]["breakers"] == [{"step": "primary", "state": "closed"}]


def test_the_history_route_answers_points_and_presence(api: Api) -> None:
    history = api.get("/devices/cam-2/history", Role.VIEWER)
    assert history.status_code == 200, history.text
    body = history.json()
    assert body["resolution_s"] == 60
    assert [(p["samples"], p["cpu_avg"], p["cpu_max"]) for p in body["points"]] == [(2, 15.0, 20.0)]
    assert [(c["online"], c["reason"]) for c in body["presence"]] == [(True, "connected")]
    month = api.get(
        "/devices/cam-2/history",
        Role.VIEWER,
        params={"since": "2026-11-01T12:00:00Z", "until": "2026-12-01T12:00:00Z"},
    ).json()
    assert month["resolution_s"] == 3600 and month["points"][0]["samples"] == 2
    bad = api.get("/devices/cam-2/history", Role.VIEWER, params={"since": "2026-12-01T13:00:00Z"})
    assert bad.status_code == 422 and "since must be before until" in bad.json()["detail"]
    naive = api.get("/devices/cam-2/history", Role.VIEWER, params={"since": "2026-12-01T10:00:00"})
    assert naive.status_code == 422 and "time zone" in naive.json()["detail"]
    assert api.get("/devices/nope/history", Role.VIEWER).status_code == 404
    assert api.get("/devices/cam-2/history", None).status_code == 401


@pytest.fixture
def served(api: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with serve(api) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.VIEWER])
        yield api


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def test_devices_health_exits_by_the_named_devices(served: Api, run: Cli) -> None:
    out, _ = run("devices", "health", "cam-1")
    assert out.split() == ["cam-1", "ok"]
    out, _ = run("devices", "health", "cam-1", "cam-2", status=1)
    lines = out.splitlines()
    assert lines[0].split() == ["cam-1", "ok"]
    assert lines[1].startswith("cam-2  failing   model failing: 30% errors")
    assert "; 1 open alert: feature-drift (pixels[3])" in lines[1]
    out, _ = run("devices", "health", status=1)  # every device: one is not ok
    assert len(out.splitlines()) == 2
    out, _ = run("devices", "health", "--json", "cam-2", status=1)
    assert '"state": "failing"' in out
    _, err = run("devices", "health", "nope", status=2)
    assert err.startswith("error [not-enrolled]: no enrolled device nope")
    _, err = run("devices", "health", "cam-1", "--tag", "site=x", status=2)
    assert err.strip() == "error [usage]: give device ids or --tag, not both"


def test_a_device_with_no_model_reads_no_model_in_health_and_list(
    served: Api, run: Cli, sqlite_database: Database
) -> None:
    with sqlite_database.session() as session:
        session.add(device("cam-3", model_name=None, model_version=None, health="unknown"))
    out, _ = run("devices", "health", "cam-3", status=1)
    assert out.strip() == f"cam-3  no-model  {NO_MODEL}"
    out, _ = run("devices", "list")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["DEVICE", "ONLINE", "VERDICT", "MODEL"]
    assert [row.split()[:4] for row in rows] == [
        ["cam-1", "yes", "ok", "demo@1.0.0"],
        ["cam-2", "yes", "failing", "demo@1.0.0"],
        ["cam-3", "yes", "no-model", "-"],
    ]


def test_devices_health_prints_what_is_known_and_names_the_unknown_ids(
    served: Api, run: Cli
) -> None:
    out, err = run("devices", "health", "cam-1", "cam-5", "cam-2", "cam-9", status=2)
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["cam-1", "ok"], ["cam-2", "failing"]]
    assert err.strip() == (
        "error [not-enrolled]: no enrolled devices cam-5, cam-9 "
        "(`edgefleet devices list` shows the enrolled ids)"
    )
    out, err = run("devices", "health", "--json", "cam-1", "cam-5", status=2)
    assert '"id": "cam-1"' in out and "cam-5" in err


def test_devices_health_colours_a_terminal_unless_no_color(
    served: Api, run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = run("devices", "health", "cam-1")
    assert "\033[" not in out  # not a terminal
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    out, _ = run("devices", "health", "cam-1", "cam-2", status=1)
    assert "\033[32m" in out and "\033[31m" in out  # green ok, red failing
    assert "ok" in out and "failing" in out  # the word is there, colour or not
    monkeypatch.setenv("NO_COLOR", "1")
    out, _ = run("devices", "health", "cam-1", "cam-2", status=1)
    assert "\033[" not in out and out.splitlines()[1].startswith("cam-2  failing ")


def test_devices_show_prints_the_heartbeat_without_json(served: Api, run: Cli) -> None:
    out, _ = run("devices", "show", "cam-1")
    assert "verdict:          ok" in out
    for expected in (
        "CPU:            12.5%",
        "memory:         512.0 MiB of 2.0 GiB (25%)",
        "disk free:      20.0 GiB of 32.0 GiB (62%)",
        "temperature:    48.0 °C",
        "link:           2 connects, 1 connections lost, 0 publish failures, 3 queued",
        "breakers:       primary closed",
        "trust root:     1",
        "frozen out:     no",
    ):
        assert f"  {expected}" in out, expected
