"""The pages' queries of a device's telemetry go by device and time, not through every
bucket the device kept (30 days of 5-minute buckets: bench/web_pages.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device
from edgefleet.server.history import verdict_facts
from edgefleet.server.web.devicedata import version_figures

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
DEVICE_TIME_INDEX = "ix_telemetry_buckets_device_id_bucket_start"


def telemetry_plans(db: Database, action: Callable[[], object]) -> list[str]:
    """SQLite's query plan of each statement on telemetry_buckets that `action` runs."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM telemetry_buckets" in statement:
            seen.append((statement, params))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    with db.engine.connect() as conn:
        return [
            " / ".join(
                row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
            )
            for statement, params in seen
        ]


def test_the_list_verdicts_read_the_last_hour_by_device_and_time(
    sqlite_database: Database,
) -> None:
    with sqlite_database.session() as session:
        plans = telemetry_plans(
            sqlite_database, lambda: verdict_facts(session, ["dev-1", "dev-2"], NOW)
        )
    assert len(plans) == 1
    assert f"USING INDEX {DEVICE_TIME_INDEX} (device_id=? AND bucket_start>?)" in plans[0]


def test_the_device_page_reads_its_figures_by_device_and_time(sqlite_database: Database) -> None:
    device = Device(id="dev-1", model_name="demo", model_version="1.9.0")
    with sqlite_database.session() as session:
        plans = telemetry_plans(
            sqlite_database,
            lambda: version_figures(session, device, NOW - dt.timedelta(hours=24)),
        )
    assert len(plans) == 2  # the sums per version, the latency histograms
    for plan in plans:
        assert f"USING INDEX {DEVICE_TIME_INDEX} (device_id=? AND bucket_start>?)" in plan
