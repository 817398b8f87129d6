"""Benchmark: a rollout's status (`GET /rollouts/{id}`, and each judgement of a stage) on a
fleet with history, against a raw SELECT.

Setup, in one run: a fresh database (SQLite, or a fresh PostgreSQL database with --db)
holding --devices enrolled devices (the rows of `bench/server_notify.py`) that served the
previous version for --history-hours before the rollout (one telemetry bucket per device
and 5 minutes, with a latency histogram), and a rollout of the
bundle, one stage of every device, --stage-minutes old, with the new version's buckets of
that time (a little slower, so the latency gate judges).

Rounds alternate, in this process, each in a session of its own:

- status: `rollout_status`, what the route and the driver's judgement run: the device
  states, the stage's sums, the newest latency buckets (`latency_lookback`), the drift
  alerts and the gates, everything read afresh;
- status, reading kept: the same as the route and the driver run it on a large stage
  within a few seconds of a first reading, whose telemetry they keep
  (`stagetelemetry.StageTelemetryCache`): the device states, drift alerts and gates
  afresh;
- whole history: the same with every latency bucket of the 24 hours before the stage and
  of the last 24 hours since it started (all of them, for a stage under a day old, as
  read before 7 December 2026);
- stage sums, running: the new version's requests, errors, fallbacks and reporting
  devices since the stage started, as the status reads them, from the buckets' running
  sums (`edgefleet.server.spans`);
- stage sums, added up: the same by adding up every bucket since the stage started (as
  read before 7 December 2026);
- raw: the peer, the least any status does: one SQLAlchemy Core `SELECT state, count(*)
  FROM rollout_devices WHERE rollout_id = ? GROUP BY state`.

The buckets are written by ingestion's own writer (`store_buckets`), a flush per bucket
time. Best and median over the rounds; ratios status / raw, whole history / status and
added up / running. Both statuses' latency verdicts are printed, and both readings of the
sums: exit status 1 when the verdicts (passed or failed) or the sums differ.

    PYTHONPATH=. .venv-test/bin/python bench/rollout_status.py [--devices 1000] \
        [--history-hours 24] [--stage-minutes 10] [--rounds 5] \
        [--db postgresql+psycopg://u:p@host/postgres] [--json]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from bench.server_notify import BUNDLE, add_fleet, device_id, scratch_database
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import BundleRow, RolloutDevice, TelemetryBucket, TelemetryLatest
from edgefleet.server.mqtt.aggregate import TelemetryAggregate
from edgefleet.server.mqtt.buckets import store_buckets
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts import stagetelemetry
from edgefleet.server.rollouts.latency import LATENCY_WINDOW, latency_lookback
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.service import rollout_status, start_rollout
from edgefleet.server.rollouts.stagetelemetry import StageTelemetryCache
from edgefleet.server.spans import span_sums
from edgefleet.tables import format_columns
from edgefleet.timefmt import utcnow

BUCKET = dt.timedelta(minutes=5)
SERVED = "1.9.0"  # what `add_fleet`'s devices serve of BUNDLE's name
BOUNDS_MS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
BEFORE = [40, 30, 20, 6, 3, 1, 0, 0]  # p95 10 ms
AFTER = [20, 30, 25, 15, 6, 3, 1, 0]  # p95 20 ms: the gate (x1.5 at most) fails


def aggregate(counts: list[int]) -> TelemetryAggregate:
    """A bucket of 5 windows with this latency histogram, every request answered."""
    return TelemetryAggregate(
        windows=5,
        requests=sum(counts),
        latency={"bounds_ms": BOUNDS_MS, "counts": list(counts)},
    )


def fill(db: Database, devices: int, history_buckets: int, stage_buckets: int) -> tuple[int, Any]:
    """The fleet, its history, a rollout of every device: the rollout's id and the time the
    status is asked at. The buckets are stored as ingestion stores them (`store_buckets`),
    one flush per bucket time, oldest first."""
    add_fleet(db, devices, all_online=True)  # serving SERVED; BUNDLE is rolled out
    started = utcnow().replace(second=0, microsecond=0) - BUCKET * stage_buckets
    times = [(SERVED, started - BUCKET * (b + 1), BEFORE) for b in range(history_buckets)]
    times = times[::-1] + [(BUNDLE[1], started + BUCKET * b, AFTER) for b in range(stage_buckets)]
    for version, start, counts in times:
        with db.session() as session:
            store_buckets(
                session,
                {
                    (device_id(index), BUNDLE[0], version, start): aggregate(counts)
                    for index in range(devices)
                },
                lock=db.engine.dialect.name != "sqlite",
            )
    with db.session() as session:
        bundle = session.scalars(select(BundleRow)).one()
        rollout = start_rollout(
            session,
            bundle=bundle,
            selector={},
            plan=plan_from_dict({"stages": [{"percent": 100}], "gates": {"bake_s": 600}}),
            actor=Principal("bench", Role.OPERATOR),
            now=started,
        )
        rollout_id = rollout.id
        # What the driver records as it notifies each device: what it served before.
        session.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout_id)
            .values(previous_version=SERVED)
        )
    return rollout_id, started + BUCKET * stage_buckets


def running_sums(session: Session, rollout_id: int, since: dt.datetime) -> tuple[int, ...]:
    """The stage's new-version requests, errors, fallbacks and reporting devices, as the
    status reads them: from the buckets' running sums."""
    sums = span_sums(
        session,
        and_(
            TelemetryLatest.device_id == RolloutDevice.device_id,
            RolloutDevice.rollout_id == rollout_id,
            TelemetryLatest.bundle_name == BUNDLE[0],
            TelemetryLatest.bundle_version == BUNDLE[1],
        ),
        first=lambda start: start > since,
    )
    return (*(sums.count(name) for name in ("requests", "errors", "fallbacks")), sums.active)


def added_up(session: Session, rollout_id: int, since: dt.datetime) -> tuple[int, ...]:
    """The same by adding up every bucket since the stage started (read so before
    7 December 2026)."""
    row = session.execute(
        select(
            func.sum(TelemetryBucket.requests),
            func.sum(TelemetryBucket.errors),
            func.sum(TelemetryBucket.fallbacks),
            func.count(func.distinct(TelemetryBucket.device_id)),
        ).where(
            TelemetryBucket.device_id == RolloutDevice.device_id,
            RolloutDevice.rollout_id == rollout_id,
            TelemetryBucket.bundle_name == BUNDLE[0],
            TelemetryBucket.bundle_version == BUNDLE[1],
            TelemetryBucket.bucket_start > since,
            TelemetryBucket.requests > 0,
        )
    ).one()
    return tuple(int(value) for value in row)


def whole_history(devices: int, bucket: dt.timedelta) -> dt.timedelta:
    return LATENCY_WINDOW


def measure(
    scratch: Path, devices: int, hours: float, minutes: int, rounds: int, admin_url: str | None
) -> dict[str, Any]:
    history_buckets, stage_buckets = round(hours * 12), max(1, minutes // 5)
    with scratch_database(admin_url, scratch) as url:
        db = open_database(url)
        try:
            began = time.perf_counter()
            rollout_id, now = fill(db, devices, history_buckets, stage_buckets)
            filled = time.perf_counter() - began
            bounded = stagetelemetry.latency_lookback
            verdicts: dict[str, str] = {}  # the latency gate's detail, which names its reach
            passed: dict[str, bool | None] = {}

            def status(lookback: Callable[[int, dt.timedelta], dt.timedelta], name: str) -> None:
                stagetelemetry.latency_lookback = lookback
                try:
                    with db.session() as session:
                        result = rollout_status(session, rollout_id, now)
                finally:
                    stagetelemetry.latency_lookback = bounded
                checks = result.stages[0].checks or []
                check = next(c for c in checks if c.name == "max_latency_p95_ratio")
                verdicts[name] = f"{check.passed}: {check.detail}"
                passed[name] = check.passed

            def raw() -> None:
                with db.engine.connect() as conn:
                    conn.execute(
                        select(RolloutDevice.state, func.count())
                        .where(RolloutDevice.rollout_id == rollout_id)
                        .group_by(RolloutDevice.state)
                    ).all()

            since = now - BUCKET * stage_buckets - BUCKET  # as `stage_counts` reads it
            sums: dict[str, tuple[int, ...]] = {}

            def stage_sums(read: Callable[[Session, int, dt.datetime], tuple[int, ...]]) -> None:
                with db.session() as session:
                    sums[read.__name__] = read(session, rollout_id, since)

            # The driver's and the routes' reading of a large stage, kept a few seconds:
            # read once here, then each round within its time (the same `now`).
            kept = StageTelemetryCache()
            with db.session() as session:
                rollout_status(session, rollout_id, now, telemetry=kept)

            def status_kept() -> None:
                with db.session() as session:
                    rollout_status(session, rollout_id, now, telemetry=kept)

            rounds_of: dict[str, Callable[[], None]] = {
                "status": lambda: status(bounded, "status"),
                "status, reading kept": status_kept,
                "whole history": lambda: status(whole_history, "whole history"),
                "stage sums: running": lambda: stage_sums(running_sums),
                "stage sums: added up": lambda: stage_sums(added_up),
                "raw": raw,
            }
            times: dict[str, list[float]] = {name: [] for name in rounds_of}
            for _ in range(rounds):
                for name, run in rounds_of.items():
                    began = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - began)
            database = db.engine.dialect.name
        finally:
            db.dispose()
    ms = {
        name: {"best_ms": min(t) * 1000, "median_ms": statistics.median(t) * 1000}
        for name, t in times.items()
    }
    return {
        "devices": devices,
        "history_buckets": devices * history_buckets,
        "stage_buckets": devices * stage_buckets,
        "stage_minutes": stage_buckets * 5,
        "latency_minutes": round(latency_lookback(devices, BUCKET).total_seconds() / 60),
        "database": database,
        "fill_s": filled,
        "rounds": rounds,
        "times": ms,
        "status_vs_raw": ms["status"]["best_ms"] / ms["raw"]["best_ms"],
        "whole_vs_status": ms["whole history"]["best_ms"] / ms["status"]["best_ms"],
        "status_vs_kept": ms["status"]["best_ms"] / ms["status, reading kept"]["best_ms"],
        "added_vs_running": ms["stage sums: added up"]["best_ms"]
        / ms["stage sums: running"]["best_ms"],
        "verdicts": verdicts,
        "passed": passed,
        "sums": sums,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def table(r: dict[str, Any]) -> str:
    rows = [("rollout status", "best", "median")]
    rows += [
        (name, f"{t['best_ms']:.1f} ms", f"{t['median_ms']:.1f} ms")
        for name, t in r["times"].items()
    ]
    return "\n".join(
        [
            f"{r['devices']:,} devices in {r['database']} (filled in {r['fill_s']:.0f} s): "
            f"{r['history_buckets']:,} buckets of the previous version before the stage, "
            f"{r['stage_buckets']:,} of the new one in its {r['stage_minutes']} min; "
            f"the latency gate reads {r['latency_minutes']} min back; {r['rounds']} rounds "
            f"alternating; python {r['python']}, {r['cpus']} CPUs",
            "",
            format_columns(rows),
            "",
            f"status / raw: {r['status_vs_raw']:.0f}x; "
            f"whole history / status: {r['whole_vs_status']:.1f}x; "
            f"status / with the reading kept: {r['status_vs_kept']:.1f}x; "
            f"stage sums added up / running: {r['added_vs_running']:.1f}x",
            *(f"latency gate, {name}: {verdict}" for name, verdict in r["verdicts"].items()),
            *(
                f"stage sums, {name} (requests, errors, fallbacks, reporting): {values}"
                for name, values in r["sums"].items()
            ),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--history-hours", type=float, default=24.0)
    parser.add_argument("--stage-minutes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--db", help="PostgreSQL URL of a role that may CREATE DATABASE (default: SQLite)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-status-") as scratch:
        result = measure(
            Path(scratch),
            args.devices,
            args.history_hours,
            args.stage_minutes,
            args.rounds,
            args.db,
        )
    print(json.dumps(result, indent=2) if args.json else table(result))
    agree = len(set(result["passed"].values())) == 1 and len(set(result["sums"].values())) == 1
    if not agree:
        print("the two readings disagree", file=sys.stderr)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
