"""Benchmark: `GET /api/v1/devices` latency with 10,000 devices, against a raw SELECT.

Setup, in one run: a fresh database (SQLite, or a fresh PostgreSQL database
with --db) holding --devices enrolled devices as they look in service
(heartbeat stored, four tags, a model served, a tenth offline; the rows of
`bench/server_notify.py`), migrated by the server's own migrations, and a
viewer API token. The real app (`create_app` on a `ServerContext`, as the
runner builds it) is served by uvicorn in a child process (a separate
interpreter: the client does not share the server's GIL), with the API rate
limit raised far above what the bench sends (said in the output).

Rounds alternate, for the default page (limit 100) and for limit=1000:

- api: GET /api/v1/devices[?limit=1000] with httpx over one keep-alive
  connection; the whole request: token check, the page query, the count
  query, `DevicePublic` rows, JSON, HTTP.
- raw: the peer, in this process: the same rows by a SQLAlchemy Core
  `SELECT * FROM devices ORDER BY id LIMIT n` on a pooled connection, fetched
  as tuples. The least any server answering from this database can do.

For a breakdown, two in-process steps in the same rounds: `orm` (a
`Database.session()` with `list_devices` + `count_devices`, the route's
queries) and `orm+json` (that plus `DevicePublic.model_validate` and JSON, the
route's work without HTTP); and `GET /api/v1/health` over the same connection
(no token, one `SELECT 1` session: the floor of a request to this app).
p50 and p95 over every sample; ratio = api / raw.

    PYTHONPATH=. .venv-test/bin/python bench/server_devices_list.py [--devices 10000] \
        [--rounds 10] [--db postgresql+psycopg://u:p@host/postgres] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select

from bench.server_notify import add_fleet, scratch_database
from edgefleet.keys import SigningKey
from edgefleet.server.api.app import create_app
from edgefleet.server.api.schemas.devices import DeviceList, DevicePublic
from edgefleet.server.bundles import BundleStore
from edgefleet.server.context import ServerContext
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import Device
from edgefleet.server.devices import count_devices, list_devices
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings
from edgefleet.server.tokens import create_api_token
from edgefleet.server.trustroots import open_trust_roots
from edgefleet.tables import format_columns
from tests.agent.broker import free_port
from tests.conftest import KeySet, make_trust_root

API_RATE_PER_MINUTE = 10_000_000
PAGES = {"default page (100)": 100, "limit=1000": 1000}
# Samples per round and page size (about equal time per page size).
PER_ROUND = {100: 30, 1000: 6}


def serve_child(db_url: str, data_dir: str) -> None:
    """Run in a child process: the app on `db_url` under uvicorn until stdin closes."""
    directory = Path(data_dir)
    settings = ServerSettings(
        data_dir=directory,
        trust_path=directory / "trust.json",
        server_key_path=directory / "server.key",
        db_url=db_url,
        api_rate_per_minute=API_RATE_PER_MINUTE,
    )
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    trust = make_trust_root(keys)
    db = Database(db_url)
    context = ServerContext(
        settings=settings,
        db=db,
        trust=open_trust_roots(db, trust, None),
        bundles=BundleStore(directory, trust),
        publisher=_NoPublisher(),
    )
    config = uvicorn.Config(
        create_app(context),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            sys.exit("uvicorn did not start")
        time.sleep(0.01)
    print(f"ready {config.port}", flush=True)
    sys.stdin.read()
    server.should_exit = True
    thread.join(10)
    db.dispose()


class _NoPublisher:
    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        raise RuntimeError("this bench publishes nothing")


class ServedApp:
    """The child process serving the app; `.url` once it listens."""

    def __init__(self, db_url: str, data_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-child", db_url, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("the server did not start")
        self.url = f"http://127.0.0.1:{line[1]}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def measure(scratch: Path, devices: int, rounds: int, admin_url: str | None) -> dict[str, Any]:
    with scratch_database(admin_url, scratch) as url:
        db = open_database(url)
        try:
            started = time.perf_counter()
            add_fleet(db, devices)
            fill_s = time.perf_counter() - started
            with db.session() as session:
                token, _ = create_api_token(session, "bench-viewer", Role.VIEWER)
            served = ServedApp(url, scratch)
            try:
                samples = run_rounds(served.url, token, db, rounds)
            finally:
                served.close()
        finally:
            db.dispose()
    results: dict[str, Any] = {}
    for label, limit in PAGES.items():
        stats: dict[str, Any] = {}
        for kind, values in samples[limit].items():
            ordered = sorted(values)
            stats[kind] = {
                "n": len(values),
                "p50_ms": statistics.median(ordered) * 1e3,
                "p95_ms": ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1e3,
            }
        stats["ratio_p50"] = stats["api"]["p50_ms"] / stats["raw"]["p50_ms"]
        stats["ratio_p95"] = stats["api"]["p95_ms"] / stats["raw"]["p95_ms"]
        results[label] = stats
    return {
        "devices": devices,
        "rounds": rounds,
        "database": "postgresql" if admin_url else "sqlite",
        "fill_s": fill_s,
        "api_rate_per_minute": API_RATE_PER_MINUTE,
        "pages": results,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def run_rounds(
    base_url: str, token: str, db: Database, rounds: int
) -> dict[int, dict[str, list[float]]]:
    headers = {"Authorization": f"Bearer {token}"}
    columns = Device.__table__.columns

    def api(limit: int) -> None:
        params = {"limit": limit} if limit != 100 else {}
        response = client.get("/api/v1/devices", params=params)
        response.raise_for_status()
        body = response.json()
        if len(body["items"]) != limit:
            raise RuntimeError(f"the API answered {len(body['items'])} devices, not {limit}")

    def raw(limit: int) -> None:
        with db.engine.connect() as conn:
            rows = conn.execute(select(*columns).order_by(columns["id"]).limit(limit)).all()
        if len(rows) != limit:
            raise RuntimeError("the raw SELECT returned too few rows")

    def orm(limit: int) -> None:
        with db.session() as session:
            list_devices(session, limit=limit)
            count_devices(session)

    def orm_json(limit: int) -> None:
        with db.session() as session:
            rows = list_devices(session, limit=limit)
            total = count_devices(session)
            DeviceList(
                items=[DevicePublic.model_validate(r) for r in rows], total=total
            ).model_dump_json()

    def floor(limit: int) -> None:
        client.get("/api/v1/health").raise_for_status()

    steps = {"api": api, "raw": raw, "orm": orm, "orm+json": orm_json, "health": floor}
    samples: dict[int, dict[str, list[float]]] = {
        limit: {kind: [] for kind in steps} for limit in PAGES.values()
    }
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for limit in PAGES.values():  # warm up: connections, caches, first-call imports
            for step in steps.values():
                for _ in range(3):
                    step(limit)
        for _ in range(rounds):
            for limit in PAGES.values():
                for kind, step in steps.items():
                    for _ in range(PER_ROUND[limit]):
                        started = time.perf_counter()
                        step(limit)
                        samples[limit][kind].append(time.perf_counter() - started)
    return samples


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        ("GET /api/v1/devices", "api p50", "raw p50", "ratio", "api p95", "raw p95", "ratio")
    ]
    notes = []
    for label, s in r["pages"].items():
        rows.append(
            (
                label,
                f"{s['api']['p50_ms']:.1f} ms",
                f"{s['raw']['p50_ms']:.2f} ms",
                f"{s['ratio_p50']:.1f}x",
                f"{s['api']['p95_ms']:.1f} ms",
                f"{s['raw']['p95_ms']:.2f} ms",
                f"{s['ratio_p95']:.1f}x",
            )
        )
        notes.append(
            f"{label}: p50 raw SELECT {s['raw']['p50_ms']:.2f} ms -> route queries (ORM "
            f"list_devices + count_devices) {s['orm']['p50_ms']:.2f} ms -> + DevicePublic and "
            f"JSON {s['orm+json']['p50_ms']:.2f} ms -> over HTTP {s['api']['p50_ms']:.2f} ms "
            f"({s['api']['n']} requests; GET /api/v1/health, the HTTP floor with one "
            f"session, {s['health']['p50_ms']:.2f} ms)"
        )
    header = (
        f"{r['devices']:,} devices (heartbeat, 4 tags, model set) in {r['database']} "
        f"(filled in {r['fill_s']:.1f} s); app served by uvicorn in a child process, httpx over "
        f"one keep-alive connection; API rate limit raised to {r['api_rate_per_minute']:,}/min "
        f"(no 429s); {r['rounds']} rounds alternating api/raw/orm/orm+json/health; "
        f"python {r['python']}, {r['cpus']} CPUs"
    )
    return "\n".join([header, format_columns(rows, rule=True), *notes])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--db", help="PostgreSQL URL of a role that may CREATE DATABASE (default: SQLite)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-child", nargs=2, metavar=("DB", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(*args.serve_child)
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-devices-") as scratch:
        result = measure(Path(scratch), args.devices, args.rounds, args.db)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
