"""Benchmark: the pages with 10,000 devices and 30 days of history, beside their raw queries.

Setup, in one run: a fresh database (SQLite; with --pg also a fresh PostgreSQL
database, when one is reachable), migrated by the server's own migrations and
filled through the real models (Core inserts of their tables):

- --devices enrolled devices (bench/server_notify.py's rows, varied): four
  hardware profiles, model demo 1.9.0 on most, 1.8.1 on a twentieth, none on
  a few; a tenth offline, a few never seen; model health ok, degraded on one
  in 50, failing on one in 211;
- the watched devices (--watched, the device page's among them): 30 days of
  5-minute telemetry buckets each (8,640: demo 1.8.1 until 12 hours ago,
  then 1.9.0, so the page compares the two), heartbeat history as retention
  leaves 30 days of it (1-minute slots for the last 24 hours, 15-minute ones
  back to 7 days, hourly ones back to 30 days: 2,568 rows), a flapping link
  (a presence change every 18 hours), 20 status reports, drift states for 12
  features, 3 open alerts and 3 answered diagnostics of 200 log lines;
- the rest of the fleet: the last --fleet-hours of 5-minute telemetry buckets
  per device serving a model, the last 30 minutes of 1-minute heartbeat slots
  per online device, two presence changes and three status reports each: the
  rows the list's verdicts read (last hour, last 24 hours) among rows they
  must skip, so a query that scans by time instead of by device shows;
- alerts: an open one on every 25th device and for 5 cohorts, 3,000 resolved;
  one running rollout (stage 2 of 3, a tenth of the fleet) and 20 completed.

On PostgreSQL the filled tables are ANALYZEd (what autovacuum would do soon
after) and autovacuum is off for them, so no worker holds the database when
the bench drops it.

The overview reads no telemetry: its aggregates run over every device row
and the alerts. A viewer signs in at /login (a real session cookie); the
pages are rendered by the real app (`create_app`) through Starlette's
TestClient, in this process. Timed, in alternating rounds, per page:

- page: GET of the page, the whole server-side work: session check, queries,
  verdicts, charts, template;
- raw: the SQL statements that GET ran (captured from the engine during a
  warm-up request), replayed alone through the DBAPI on one pooled
  connection, rows fetched as tuples: what the page costs the database.

p50 and p95 over every sample; ratio = page / raw; goal: page p95 < 200 ms.

    PYTHONPATH=. .venv-test/bin/python bench/web_pages.py [--devices 10000] \
        [--rounds 10] [--watched 20] [--fleet-hours 2] [--pg [URL]] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, insert, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from bench.server_notify import BUNDLE, device_id, device_row, scratch_database
from edgefleet.keys import SigningKey
from edgefleet.server.api.app import create_app
from edgefleet.server.bundles import BundleStore
from edgefleet.server.context import ServerContext
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import (
    Alert,
    BundleRow,
    Device,
    DeviceState,
    DiagnosticsRequest,
    DriftState,
    HeartbeatSample,
    PresenceChange,
    Rollout,
    RolloutDevice,
    RolloutState,
    RolloutTransition,
    StatusReportRow,
    TelemetryBucket,
)
from edgefleet.server.history import DOWNSAMPLING, SLOT_S, slot_start
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings
from edgefleet.server.tokens import create_api_token
from edgefleet.tables import format_columns
from edgefleet.timefmt import format_time, utcnow
from tests.conftest import KeySet, make_trust_root

DEFAULT_POSTGRES = "postgresql+psycopg://edgefleet:edgefleet@127.0.0.1:5432/postgres"
GOAL_P95_MS = 200.0
PROFILES = ("x86_64-avx2", "x86_64-vnni", "aarch64", "armv7-tflite")
VERSIONS = ("1.7.0", "1.8.1", "1.9.0", "2.0.0")
BUCKET = dt.timedelta(minutes=5)
DAYS = 30
UPGRADED = dt.timedelta(hours=12)  # the watched devices moved from 1.8.1 to 1.9.0 this long ago
FEATURES = [f"f{i}" for i in range(12)]
LATENCY_BOUNDS = [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
ALERT_KINDS = ("feature-drift", "prediction-drift", "accuracy-drop")
COHORTS = ("version", "tag:site=berlin", "tag:site=lyon", "profile:aarch64", "tag:line=3")
CHUNK = 2000
SAMPLES_PER_ROUND = 6
WATCHED_PAGE = 7  # device_id(7) is the device page's device


def pages(devices: int) -> dict[str, str]:
    last = max(1, -(-devices // 50))
    return {
        "overview /": "/",
        "device list, page 1": "/devices",
        "device list, filtered": "/devices?tag=site%3Dlyon&model=demo%401.9.0&online=yes"
        "&sort=last_seen&page=3",
        f"device list, page {last} by health": f"/devices?sort=health&page={last}",
        "device page": f"/devices/{device_id(WATCHED_PAGE)}",
    }


# --- the fleet ---------------------------------------------------------------------------------


def watched_ids(devices: int, watched: int) -> list[str]:
    """The devices with 30 days of history: the first `watched` ever seen (the list's
    first page, the device page's device among them)."""
    return [device_id(i) for i in range(devices) if _seen(i)][:watched]


def _seen(index: int) -> bool:
    return index % 333 != 0


def _online(index: int) -> bool:
    return index % 10 != 0 and _seen(index)


def _model(index: int) -> tuple[str | None, str | None, str | None]:
    """Model name, version and previous version of device `index`."""
    if index % 97 == 0:
        return None, None, None
    if index % 20 == 0:
        return BUNDLE[0], "1.8.1", "1.7.0"
    return BUNDLE[0], "1.9.0", "1.8.1"


def fleet_device(index: int, now: dt.datetime, watched: bool) -> dict[str, Any]:
    row = device_row(index, now)
    name, version, previous = _model(index)
    row.update(
        profile=PROFILES[index % len(PROFILES)],
        online=_online(index),
        model_name=name,
        model_version=version,
        previous_version=previous,
        install_state="committed" if name else "idle",
        health="failing" if index % 211 == 0 else row["health"],
    )
    if not _seen(index):  # enrolled, never connected
        row.update(last_seen=None, heartbeat=None, health="unknown")
    elif watched:
        row["heartbeat"] |= {
            "link": {"connects": 41, "disconnects": 40, "publish_failures": 3, "outbox_depth": 0},
            "breakers": [{"step": "primary", "state": "closed"}],
            "trust_root_version": 2,
            "frozen_out": False,
            "security_floors": {BUNDLE[0]: 6},
        }
    if row["heartbeat"] is not None:
        row["heartbeat"].update(model_name=name, model_version=version)
    return row


def bucket_row(device: str, version: str, start: dt.datetime, step: int) -> dict[str, Any]:
    requests = 280 + step % 40
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    counts[4], counts[5], counts[6], counts[8] = requests - 60, 40, 15, 5
    bins = {"counts": [requests // 10] * 10, "nan": 0, "below": 0, "above": requests % 10}
    return {
        "device_id": device,
        "bundle_name": BUNDLE[0],
        "bundle_version": version,
        "bucket_start": start,
        "windows": 5,
        "requests": requests,
        "errors": int(step % 7 == 0),
        "fallbacks": 2 if step % 11 == 0 else 0,
        "schema_violations": 0,
        "dropped_windows": 0,
        "shadow_requests": 0,
        "shadow_agreements": 0,
        "labelled_count": 20,
        "labelled_correct": 18 + step % 3,
        "labelled_abs_error": 0.0,
        "labelled_squared_error": 0.0,
        "latency": {"bounds_ms": LATENCY_BOUNDS, "counts": counts},
        "bins": {"inputs": {f: bins for f in FEATURES[:4]}, "outputs": {"y": bins}},
    }


def heartbeat_slot(device: str, start: dt.datetime, resolution_s: int, step: int) -> dict[str, Any]:
    samples = 2 * resolution_s // SLOT_S  # a heartbeat every 30 s
    cpu = 20.0 + step % 50
    return {
        "device_id": device,
        "slot_start": start,
        "resolution_s": resolution_s,
        "samples": samples,
        "cpu_sum": cpu * samples,
        "cpu_max": min(100.0, cpu + 15),
        "memory_used_sum": float(samples * ((300 + step % 200) << 20)),
        "memory_total": 1 << 31,
        "disk_free_min": (5 << 30) - step * 4096,
        "disk_total": 16 << 30,
        "temperature_samples": samples,
        "temperature_sum": samples * (45.0 + step % 20),
        "temperature_max": 50.0 + step % 20,
    }


def retained_slots(now: dt.datetime) -> Iterator[tuple[dt.datetime, int]]:
    """Slot starts and resolutions that 30 days of heartbeats leave after retention."""
    edges = [now - DOWNSAMPLING[0][0], now - DOWNSAMPLING[1][0], now - dt.timedelta(days=DAYS)]
    (_, fine_to_mid), (_, mid_to_coarse) = DOWNSAMPLING
    tiers = [
        (slot_start(edges[0], fine_to_mid), now, SLOT_S),
        (slot_start(edges[1], mid_to_coarse), slot_start(edges[0], fine_to_mid), fine_to_mid),
        (slot_start(edges[2], mid_to_coarse), slot_start(edges[1], mid_to_coarse), mid_to_coarse),
    ]
    for first, end, resolution_s in tiers:
        at = first
        while at < end:
            yield at, resolution_s
            at += dt.timedelta(seconds=resolution_s)


def fill(db: Database, devices: int, watched: int, fleet_hours: int) -> dict[str, int]:
    """The fleet described in the module docstring; returns rows per table."""
    now = utcnow()
    watch = set(watched_ids(devices, watched))
    rows: dict[str, list[dict[str, Any]]] = {
        table: []
        for table in (
            "devices",
            "bundles",
            "telemetry_buckets",
            "heartbeat_samples",
            "presence_changes",
            "status_reports",
            "alerts",
            "drift_states",
            "diagnostics_requests",
        )
    }
    rows["bundles"] = [
        {
            "name": BUNDLE[0],
            "version": version,
            "sha256": f"{n:02d}" * 32,
            "length": 12_345_678,
            "release_counter": 4 + n,
            "profiles": list(PROFILES),
            "min_agent_version": None,
            "manifest": {"name": BUNDLE[0], "version": version},
            "report": None,
            "pushed_by": "bench",
            "pushed_at": now - dt.timedelta(days=40 - 10 * n),
        }
        for n, version in enumerate(VERSIONS)
    ]
    buckets_per_hour = int(dt.timedelta(hours=1) / BUCKET)
    recent_start = slot_start(now, int(BUCKET.total_seconds()))
    for index in range(devices):
        ident = device_id(index)
        device = fleet_device(index, now, ident in watch)
        rows["devices"].append(device)
        if device["last_seen"] is None:
            continue
        version = device["model_version"]
        if ident in watch:
            for step in range(DAYS * 24 * buckets_per_hour if version else 0):
                start = recent_start - step * BUCKET
                shown = version if now - start < UPGRADED else device["previous_version"]
                rows["telemetry_buckets"].append(bucket_row(ident, shown, start, step))
            rows["heartbeat_samples"].extend(
                heartbeat_slot(ident, at, res, n) for n, (at, res) in enumerate(retained_slots(now))
            )
            changes = [(now - dt.timedelta(hours=18 * n), n % 2 == 0) for n in range(DAYS * 4 // 3)]
            reports = 20
            rows["drift_states"].extend(drift_state(ident, version, f, now) for f in FEATURES)
            rows["alerts"].extend(
                alert_row(ident, version, kind, now, feature)
                for kind, feature in (
                    ("feature-drift", "f1"),
                    ("feature-drift", "f2"),
                    ("prediction-drift", None),
                )
            )
        else:
            if version is not None:
                rows["telemetry_buckets"].extend(
                    bucket_row(ident, version, recent_start - step * BUCKET, step)
                    for step in range(fleet_hours * buckets_per_hour)
                )
            if device["online"]:
                rows["heartbeat_samples"].extend(
                    heartbeat_slot(ident, slot_start(now, SLOT_S) - dt.timedelta(minutes=m), 60, m)
                    for m in range(30)
                )
            dropped = now - dt.timedelta(days=3 + index % 20)
            changes = [(dropped, not device["online"])]
            changes.append((dropped + dt.timedelta(minutes=7), device["online"]))
            reports = 3
            if index % 25 == 0 and version is not None:
                rows["alerts"].append(
                    alert_row(ident, version, ALERT_KINDS[index % 3], now, FEATURES[index % 12])
                )
        rows["presence_changes"].extend(
            {
                "device_id": ident,
                "at": at,
                "online": online,
                "reason": "heartbeat after silence" if online else "last will: connection lost",
            }
            for at, online in changes
        )
        rows["status_reports"].extend(
            status_report(ident, device, n, now - dt.timedelta(days=(index + n) % 10, minutes=n))
            for n in range(reports)
        )
    rows["alerts"].extend(
        alert_row(None, "1.9.0", "feature-drift", now, FEATURES[n], cohort=cohort)
        for n, cohort in enumerate(COHORTS)
    )
    rows["alerts"].extend(
        alert_row(device_id(3 * n + 1), "1.8.1", ALERT_KINDS[n % 3], now, None, resolved=True)
        for n in range(min(3000, devices // 3))
    )
    page_device = device_id(WATCHED_PAGE)
    rows["diagnostics_requests"] = [diagnostics(page_device, n, now) for n in range(3)]
    with db.session() as session:
        for table, values in rows.items():
            for start in range(0, len(values), CHUNK):
                session.execute(insert(_TABLES[table]), values[start : start + CHUNK])
        add_rollouts(session, devices, now)
    return {table: len(values) for table, values in rows.items()}


_TABLES = {
    "devices": Device,
    "bundles": BundleRow,
    "telemetry_buckets": TelemetryBucket,
    "heartbeat_samples": HeartbeatSample,
    "presence_changes": PresenceChange,
    "status_reports": StatusReportRow,
    "alerts": Alert,
    "drift_states": DriftState,
    "diagnostics_requests": DiagnosticsRequest,
}


def status_report(device: str, row: dict[str, Any], n: int, at: dt.datetime) -> dict[str, Any]:
    states = ("downloading", "verifying", "checking", "staging", "activating", "committed")
    return {
        "device_id": device,
        "sequence": 100 + n,
        "received_at": at,
        "sent_at": at,
        "install_state": states[n % len(states)],
        "bundle_name": row["model_name"],
        "bundle_version": row["model_version"],
        "directive_sequence": 3,
        "reason": "checked: disk and memory suffice" if n % 6 == 2 else None,
    }


def alert_row(
    device: str | None,
    version: str,
    kind: str,
    now: dt.datetime,
    feature: str | None,
    *,
    cohort: str | None = None,
    resolved: bool = False,
) -> dict[str, Any]:
    opened = now - dt.timedelta(hours=6 + (len(feature or "") * 7) % 40)
    return {
        "kind": kind,
        "scope": "cohort" if cohort else "device",
        "device_id": device,
        "cohort": cohort,
        "bundle_name": BUNDLE[0],
        "bundle_version": version,
        "feature": None if kind != "feature-drift" else feature,
        "opened_at": opened - dt.timedelta(days=5 if resolved else 0),
        "resolved_at": opened if resolved else None,
        "acknowledged_by": None,
        "acknowledged_at": None,
        "evidence": {"statistic": 0.31, "threshold": 0.2, "samples": 500, "psi": 0.4, "js": 0.3},
    }


def drift_state(device: str, version: str, feature: str, now: dt.datetime) -> dict[str, Any]:
    statistic = 0.05 + 0.03 * int(feature[1:])
    return {
        "scope": "device",
        "subject": device,
        "bundle_name": BUNDLE[0],
        "bundle_version": version,
        "kind": "feature-drift",
        "feature": feature,
        "persistence": {"over": 2 if statistic > 0.2 else 0, "under": 0},
        "window_end": now - dt.timedelta(minutes=4),
        "statistic": statistic,
        "threshold": 0.2,
    }


def diagnostics(device: str, n: int, now: dt.datetime) -> dict[str, Any]:
    asked = now - dt.timedelta(hours=3 * n + 1)
    lines = [
        {
            "at": format_time(asked - dt.timedelta(seconds=200 - i)),
            "level": "WARNING" if i % 17 == 0 else "INFO",
            "logger": "edgefleet.agent.link",
            "message": f"published telemetry window {i}: 312 requests, 0 errors",
        }
        for i in range(200)
    ]
    return {
        "device_id": device,
        "requested_by": "operator-bench",
        "requested_at": asked,
        "expires_at": asked + dt.timedelta(minutes=5),
        "directive_sequence": 4 + n,
        "answered_at": asked + dt.timedelta(seconds=3),
        "result": {
            "sent_at": format_time(asked + dt.timedelta(seconds=2)),
            "log_lines": lines,
            "status": {"model": {"name": BUNDLE[0], "version": "1.9.0"}, "breakers": []},
        },
        "error": None,
    }


def add_rollouts(session: Any, devices: int, now: dt.datetime) -> None:
    """One running rollout of demo 2.0.0 (stage 2 of 3 over a tenth of the fleet), 20 done."""
    plan = {"stages": [{"percent": 1}, {"percent": 10}, {"percent": 100}]}
    bundle_ids = dict(session.execute(text("SELECT version, id FROM bundles")).all())
    for n in range(21):
        running = n == 20
        rollout = Rollout(
            bundle_id=bundle_ids["2.0.0" if running else VERSIONS[n % 3]],
            selector={},
            plan=plan,
            state=RolloutState.RUNNING if running else RolloutState.COMPLETED,
            stage_index=1 if running else 2,
            stage_started_at=now - dt.timedelta(hours=1),
            reason=None,
            created_by="operator-bench",
            created_at=now - dt.timedelta(days=21 - n),
            updated_at=now - dt.timedelta(days=20 - n),
        )
        session.add(rollout)
        session.flush()
        session.add(
            RolloutTransition(
                rollout_id=rollout.id,
                at=rollout.created_at,
                from_state=RolloutState.CREATED,
                to_state=RolloutState.RUNNING,
                stage_index=0,
                actor="operator-bench",
                reason="started",
            )
        )
    session.execute(
        insert(RolloutDevice),
        [
            {
                "rollout_id": rollout.id,
                "device_id": device_id(i),
                "stage_index": 0 if i < devices // 100 else 1,
                "shadow": False,
                "state": DeviceState.SUCCEEDED if i % 3 else DeviceState.NOTIFIED,
                "attempts": 1,
                "directive_sequence": 4,
                "notified_at": now - dt.timedelta(minutes=30),
                "updated_at": now - dt.timedelta(minutes=20),
                "previous_version": "1.9.0",
                "reason": None,
            }
            for i in range(1, devices, 10)
        ],
    )


# --- measuring ---------------------------------------------------------------------------------


class _NoPublisher:
    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        raise RuntimeError("this bench publishes nothing")


def signed_in_client(db: Database, data_dir: Path) -> TestClient:
    """The real app on `db`, and a browser signed in as a viewer at /login."""
    settings = ServerSettings(
        data_dir=data_dir,
        trust_path=data_dir / "trust.json",
        server_key_path=data_dir / "server.key",
        db_url=str(db.engine.url),
        api_rate_per_minute=10_000_000,
    )
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    trust = make_trust_root(keys)
    context = ServerContext(
        settings=settings,
        db=db,
        trust=trust,
        bundles=BundleStore(data_dir, trust),
        publisher=_NoPublisher(),
    )
    with db.session() as session:
        token, _ = create_api_token(session, "bench-viewer", Role.VIEWER)
    client = TestClient(create_app(context), follow_redirects=False)
    response = client.post("/login", data={"token": token})
    if response.status_code != 303:
        raise RuntimeError(f"signing in failed: {response.status_code}")
    return client


class StatementLog:
    """The SELECTs the engine runs while `recording`, as the DBAPI got them."""

    def __init__(self, engine: Engine) -> None:
        self.recording = False
        self.statements: list[tuple[str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if self.recording and not many and statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, params))

    def capture(self, action: Callable[[], None]) -> list[tuple[str, Any]]:
        self.statements, self.recording = [], True
        try:
            action()
        finally:
            self.recording = False
        return self.statements


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p95_ms": ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1e3,
    }


def measure_pages(db: Database, data_dir: Path, devices: int, rounds: int) -> dict[str, Any]:
    client = signed_in_client(db, data_dir)
    log = StatementLog(db.engine)
    shown = pages(devices)

    def get(path: str) -> None:
        response = client.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path} answered {response.status_code}")

    statements = {}
    for label, path in shown.items():
        for _ in range(3):  # warm up: imports, template compilation, statement caches
            get(path)
        statements[label] = log.capture(lambda path=path: get(path))

    def replay(label: str) -> None:
        with db.engine.connect() as conn:
            for statement, params in statements[label]:
                conn.exec_driver_sql(statement, params).fetchall()

    samples: dict[str, dict[str, list[float]]] = {label: {"page": [], "raw": []} for label in shown}
    for _ in range(rounds):
        for label, path in shown.items():
            for _ in range(SAMPLES_PER_ROUND):
                started = time.perf_counter()
                get(path)
                samples[label]["page"].append(time.perf_counter() - started)
            for _ in range(SAMPLES_PER_ROUND):
                started = time.perf_counter()
                replay(label)
                samples[label]["raw"].append(time.perf_counter() - started)
    client.close()
    results = {}
    for label, path in shown.items():
        page, raw = percentiles(samples[label]["page"]), percentiles(samples[label]["raw"])
        results[label] = {
            "path": path,
            "statements": len(statements[label]),
            "n": len(samples[label]["page"]),
            "page": page,
            "raw": raw,
            "ratio_p95": page["p95_ms"] / raw["p95_ms"],
        }
    return results


def measure(
    scratch: Path, admin_url: str | None, devices: int, watched: int, fleet_hours: int, rounds: int
) -> dict[str, Any]:
    with scratch_database(admin_url, scratch) as url:
        db = open_database(url)
        try:
            started = time.perf_counter()
            if not db.is_sqlite:  # statistics now, and no autovacuum left to block the DROP
                with db.engine.begin() as conn:
                    for name in _TABLES:
                        conn.execute(text(f"ALTER TABLE {name} SET (autovacuum_enabled = false)"))
            rows = fill(db, devices, watched, fleet_hours)
            if not db.is_sqlite:
                with db.engine.begin() as conn:
                    conn.execute(text("ANALYZE"))
            fill_s = time.perf_counter() - started
            results = measure_pages(db, scratch, devices, rounds)
        finally:
            db.dispose()
    return {
        "database": "postgresql" if admin_url else "sqlite",
        "fill_s": fill_s,
        "rows": rows,
        "pages": results,
    }


def postgres_reachable(url: str) -> bool:
    try:
        engine = create_engine(make_url(url), connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError):
        return False
    return True


def table(result: dict[str, Any]) -> str:
    args = result["args"]
    lines = [
        f"{args['devices']:,} devices, {args['watched']} watched with {DAYS} days of history "
        f"(8,640 telemetry buckets, 2,568 heartbeat slots each), the fleet's last "
        f"{args['fleet_hours']} h of buckets; {args['rounds']} rounds of {SAMPLES_PER_ROUND} "
        f"page renders (TestClient, signed-in viewer) and {SAMPLES_PER_ROUND} replays of "
        f"the page's SELECTs; python {result['python']}, {result['cpus']} CPUs"
    ]
    for run in result["runs"]:
        filled = ", ".join(f"{table} {n:,}" for table, n in run["rows"].items() if n)
        lines.append(f"\n{run['database']}: filled in {run['fill_s']:.1f} s ({filled})")
        rows: list[tuple[str, ...]] = [
            ("page", "SELECTs", "page p50", "page p95", "raw p50", "raw p95", "ratio p95", "goal")
        ]
        for label, s in run["pages"].items():
            passed = s["page"]["p95_ms"] < GOAL_P95_MS
            rows.append(
                (
                    label,
                    str(s["statements"]),
                    f"{s['page']['p50_ms']:.1f} ms",
                    f"{s['page']['p95_ms']:.1f} ms",
                    f"{s['raw']['p50_ms']:.2f} ms",
                    f"{s['raw']['p95_ms']:.2f} ms",
                    f"{s['ratio_p95']:.1f}x",
                    f"< {GOAL_P95_MS:.0f} ms p95: {'met' if passed else 'MISSED'}",
                )
            )
        lines.append(format_columns(rows, rule=True))
    lines.extend(result["notes"])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--watched", type=int, default=50)
    parser.add_argument("--fleet-hours", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--pg",
        nargs="?",
        const=os.environ.get("EDGEFLEET_TEST_POSTGRES", DEFAULT_POSTGRES),
        help="also PostgreSQL: the URL of a role that may CREATE DATABASE "
        "(default: EDGEFLEET_TEST_POSTGRES, else the tests' default)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.devices, args.watched) <= WATCHED_PAGE:
        parser.error(f"--devices and --watched must be above {WATCHED_PAGE}")
    targets: list[str | None] = [None]
    notes = []
    if args.pg:
        if postgres_reachable(args.pg):
            targets.append(args.pg)
        else:
            notes.append(f"PostgreSQL not reachable at {make_url(args.pg)!r}: measured SQLite only")
    runs = []
    for admin_url in targets:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-pages-") as scratch:
            sizes = (args.devices, args.watched, args.fleet_hours)
            runs.append(measure(Path(scratch), admin_url, *sizes, args.rounds))
    result = {
        "args": {
            "devices": args.devices,
            "watched": args.watched,
            "fleet_hours": args.fleet_hours,
            "rounds": args.rounds,
        },
        "runs": runs,
        "notes": notes,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
