"""Benchmark: time to notify every device of a rollout stage, against a raw paho publisher.

Setup, in one run: a mosquitto on a free port (persistence off, no limit on
queued or in-flight messages, so it never drops a message for a slow
subscriber), and ONE subscriber in a child process (a separate interpreter, so
it does not share our GIL) on `edgefleet/v1/devices/+/directive` at QoS 1 that
counts what arrives and when. Rounds alternate between:

- raw: a bare paho MQTT 5 client (max 1,000 in flight, as `ServerLink`) in this
  process publishes --devices directive payloads, signed before the clock
  starts, one per device topic, at QoS 1. Timed from the first publish to the
  subscriber's last receipt. This is the peer: the most this broker, this
  subscriber and a Python publisher deliver on this machine.
- edgefleet: a fresh database (SQLite, or a fresh PostgreSQL database with
  --db) holding --devices enrolled, online devices and one bundle; timed from
  the call of `start_rollout` (one stage of 100%, every device) until the
  subscriber has received a directive for every device. In between, the real
  `RolloutDriver` ticks every `driver_interval_s` (`runner.driver_worker`) and
  publishes through a real `ServerLink` (wrapped in `CountingPublisher`, as
  the runner does). The plan's rate_limit_per_minute is set far above the
  fleet size so the rate limit never throttles; the driver's own cap,
  `MAX_DIRECTIVES_PER_TICK` per rollout and tick, applies as shipped.

With --intervals, each round also drives the rollout with other
`driver_interval_s` values (0: ticks back to back) to show how much of the
time is the driver's work and how much is waiting for the next tick.
The breakdown splits the driver's time: `start_rollout` (selection and one
`rollout_devices` row per device), time inside ticks, of which
`prepare_install` (sequence UPDATE + directive build + signature) and
`publish` (handing to paho), and the idle time between ticks; and the time
spent in the database driver per kind of statement (engine cursor events:
SQL + DBAPI, without the ORM work around it). Building and signing a
directive is timed on its own while the peer's payloads are signed.
The sample directive the subscriber received first is verified with
`verify_directive` against a trust root holding the server key.

    PYTHONPATH=. .venv-test/bin/python bench/server_notify.py [--devices 10000] \
        [--rounds 2] [--intervals 1,0] [--db postgresql+psycopg://u:p@host/postgres] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, event, insert, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from edgefleet.keys import SigningKey
from edgefleet.mqtt import Directive, sign_directive, verify_directive
from edgefleet.mqtt.topics import DeviceTopics, TopicKind, device_filter
from edgefleet.server.context import CountingPublisher
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import BundleRow, Device
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts import driver as driver_module
from edgefleet.server.rollouts.driver import RolloutDriver, TickReport
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.service import start_rollout
from edgefleet.server.runner import driver_worker
from edgefleet.server.settings import ServerSettings
from edgefleet.tables import format_columns
from edgefleet.timefmt import format_time, utcnow
from edgefleet.worker import Worker
from tests.agent.broker import MosquittoBroker, host_port
from tests.conftest import PROFILE, KeySet, make_trust_root

ROUND_TIMEOUT_S = 300.0
OPERATOR = Principal("bench", Role.OPERATOR)
BUNDLE = ("demo", "2.0.0")
SITES = ("berlin", "lyon", "porto", "oslo", "graz")

SUBSCRIBER = r"""
import sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

host, port, topic_filter = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Condition()
state = {"count": 0, "first": 0.0, "last": 0.0, "topics": set(), "sample": ("", b"")}
subscribed = threading.Event()

def on_message(client, userdata, message):
    now = time.monotonic()
    with lock:
        if not state["count"]:
            state["first"] = now
            state["sample"] = (message.topic, bytes(message.payload))
        state["count"] += 1
        state["last"] = now
        state["topics"].add(message.topic)
        lock.notify_all()

c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-notify-sub", protocol=mqtt.MQTTv5)
c.on_connect = lambda c, *a: c.subscribe(topic_filter, 1)
c.on_subscribe = lambda *a: subscribed.set()
c.on_message = on_message
c.connect(host, port, 60)
c.loop_start()
if not subscribed.wait(10):
    sys.exit("the subscriber did not subscribe")
print("ready", flush=True)
for line in sys.stdin:
    want, timeout = int(line.split()[0]), float(line.split()[1])
    with lock:
        state.update(count=0, first=0.0, last=0.0, topics=set(), sample=("", b""))
    print("armed", flush=True)
    with lock:
        lock.wait_for(lambda: state["count"] >= want, timeout)
        topic, payload = state["sample"]
        print(state["count"], len(state["topics"]), repr(state["first"]), repr(state["last"]),
              topic or "-", payload.hex() or "-", flush=True)
c.disconnect()
c.loop_stop()
"""


# --- the fleet in a database (shared with bench/server_devices_list.py) -----------------------


@contextlib.contextmanager
def scratch_database(admin_url: str | None, directory: Path) -> Iterator[str]:
    """A fresh, empty database URL: an SQLite file in `directory`, or with `admin_url`
    (a PostgreSQL role allowed to CREATE DATABASE) a new database dropped afterwards.

    The PostgreSQL database keeps the server's default settings (synchronous_commit on).
    """
    if admin_url is None:
        yield f"sqlite:///{directory / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    url = make_url(admin_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    name = f"edgefleet_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


def device_id(index: int) -> str:
    return f"bench-{index:05d}"


def device_row(index: int, now: dt.datetime) -> dict[str, Any]:
    """A device as it looks after a while in service: heartbeats, tags, a model served."""
    seen = now - dt.timedelta(seconds=index % 90)
    online = index % 10 != 0  # a tenth offline (known: they were seen) ...
    return {
        "id": device_id(index),
        "public_key": f"{index:064x}",
        "enrolled_at": now - dt.timedelta(days=30, minutes=index),
        "profile": PROFILE,
        "arch": "x86_64",
        "runtimes": ["onnxruntime", "litert"],
        "agent_version": "1.4.2",
        "tags": {
            "site": SITES[index % len(SITES)],
            "line": str(index % 12),
            "env": "prod" if index % 4 else "staging",
            "hw": "rev-b",
        },
        "online": online,
        "last_seen": seen,
        "model_name": BUNDLE[0],
        "model_version": "1.9.0",
        "previous_version": "1.8.1",
        "install_state": "committed",
        "health": "ok" if index % 50 else "degraded",
        "heartbeat": {
            "device_id": device_id(index),
            "sent_at": format_time(seen),
            "uptime_s": 86_400 + index,
            "cpu_percent": 12.5 + index % 40,
            "memory_used_bytes": 300 << 20,
            "memory_total_bytes": 1 << 31,
            "disk_free_bytes": 5 << 30,
            "disk_total_bytes": 16 << 30,
            "temperature_c": 48.5,
            "agent_version": "1.4.2",
            "model_name": BUNDLE[0],
            "model_version": "1.9.0",
            "install_state": "committed",
        },
        "status_sequence": 40 + index % 7,
        "directive_sequence": 3,
    }


def add_fleet(db: Database, count: int, *, all_online: bool = False) -> None:
    """`count` enrolled devices (a few hundred rows per INSERT) and the bundle `BUNDLE`."""
    now = utcnow()
    with db.session() as session:
        rows = [device_row(i, now) for i in range(count)]
        if all_online:
            for row in rows:
                row["online"] = True
        for start in range(0, count, 500):
            session.execute(insert(Device), rows[start : start + 500])
        session.add(
            BundleRow(
                name=BUNDLE[0],
                version=BUNDLE[1],
                sha256="ab" * 32,
                length=12_345_678,
                release_counter=7,
                profiles=[PROFILE],
                min_agent_version=None,
                manifest={"name": BUNDLE[0], "version": BUNDLE[1]},
                pushed_by="bench",
                pushed_at=now,
            )
        )


# --- the subscriber child ---------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    count: int
    topics: int
    first: float  # time.monotonic() of the child (CLOCK_MONOTONIC: same clock as ours)
    last: float
    sample_topic: str
    sample: bytes


class Subscriber:
    """The counting subscriber (a child process); `arm`, publish, then `result`."""

    def __init__(self, url: str) -> None:
        host, port = host_port(url)
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, host, str(port), device_filter(TopicKind.DIRECTIVE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the subscriber did not start")

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def arm(self, expected: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{expected} {ROUND_TIMEOUT_S}\n")
        self.process.stdin.flush()
        if self._line() != "armed":
            raise RuntimeError("the subscriber did not answer")

    def result(self) -> Received:
        """Blocks until the expected count arrived (or the subscriber's timeout)."""
        count, topics, first, last, topic, sample = self._line().split()
        return Received(
            int(count),
            int(topics),
            float(first),
            float(last),
            topic,
            bytes.fromhex(sample) if sample != "-" else b"",
        )

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


# --- the peer: a raw paho publisher ------------------------------------------------------------


def bundle_row() -> BundleRow:
    """The bundle of `add_fleet`, as a detached row (for building peer directives)."""
    return BundleRow(name=BUNDLE[0], version=BUNDLE[1], sha256="ab" * 32, length=12_345_678)


def presign(
    issuer: DirectiveIssuer, count: int, sequence: int
) -> tuple[list[tuple[str, bytes]], float]:
    """Install directives like the issuer's (same fields, same sizes), signed now.

    Returns (topic, payload) pairs and the seconds per directive spent building
    and signing (what `prepare_install` does besides its sequence UPDATE).
    """
    bundle = bundle_row()
    ref = {
        "name": bundle.name,
        "version": bundle.version,
        "sha256": bundle.sha256,
        "length": bundle.length,
    }
    sources = issuer.sources(bundle)
    out = []
    started = time.perf_counter()
    for i in range(count):
        issued = issuer.clock()
        directive = Directive.model_validate(
            {
                "issued": format_time(issued),
                "expires": format_time(issued + issuer.settings.directive_ttl),
                "device_id": device_id(i),
                "sequence": sequence,
                "action": "install",
                "bundle": ref,
                "sources": sources,
                "shadow": False,
            }
        )
        out.append(
            (DeviceTopics(device_id(i)).directive, sign_directive(directive, issuer.server_keys))
        )
    return out, (time.perf_counter() - started) / count


def raw_round(url: str, subscriber: Subscriber, payloads: Sequence[tuple[str, bytes]]) -> float:
    host, port = host_port(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-raw-publisher", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    client.connect(host, port, 60)
    client.loop_start()
    try:
        subscriber.arm(len(payloads))
        start = time.monotonic()
        for topic, payload in payloads:
            client.publish(topic, payload, qos=1)
        got = subscriber.result()
    finally:
        client.disconnect()
        client.loop_stop()
    if got.count < len(payloads) or got.topics != len(payloads):
        raise RuntimeError(f"raw: the subscriber got {got.count} of {len(payloads)}")
    return got.last - start


# --- edgefleet: the rollout driver --------------------------------------------------------------


class TimedPublisher:
    """A `Publisher` adding up the time spent handing messages to the wrapped one."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.seconds = 0.0

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        started = time.perf_counter()
        self.inner.publish(topic, payload, qos=qos, retain=retain)
        self.seconds += time.perf_counter() - started


class TimedIssuer(DirectiveIssuer):
    """The real issuer; adds up the time of `prepare_install` (sequence UPDATE + signing)."""

    seconds = 0.0

    def prepare_install(
        self, session: Session, device: Device, bundle: BundleRow, *, shadow: bool
    ) -> OutgoingDirective:
        started = time.perf_counter()
        try:
            return super().prepare_install(session, device, bundle, shadow=shadow)
        finally:
            self.seconds += time.perf_counter() - started


class SqlTimer:
    """Time spent in the database driver per kind of statement ("UPDATE devices", ...).

    Hooks the engine's cursor events: the time measured is the DBAPI call
    (SQL + driver), not SQLAlchemy's ORM work around it. COMMITs are not included.
    """

    _KIND = re.compile(r"^\s*(SELECT|UPDATE|INSERT INTO|DELETE FROM)\s+(\w+)", re.I)
    _FROM = re.compile(r"\bFROM\s+(\w+)", re.I)

    def __init__(self, engine: Engine) -> None:
        self.totals: dict[str, list[float]] = {}  # kind -> [statements, seconds]
        self._started = 0.0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        elapsed = time.perf_counter() - self._started
        match = self._KIND.match(statement)
        if match is None:
            kind = statement.split(None, 1)[0].upper() if statement.strip() else "?"
        elif match.group(1).upper() == "SELECT":
            table = self._FROM.search(statement)
            kind = f"SELECT {table.group(1) if table else '?'}"
        else:
            kind = f"{match.group(1).split()[0].upper()} {match.group(2)}"
        entry = self.totals.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += elapsed

    def snapshot(self) -> dict[str, list[float]]:
        return {kind: list(v) for kind, v in self.totals.items()}


class TimedDriver(RolloutDriver):
    """The real driver; records each tick's duration, directives published and SQL so far."""

    ticks: list[tuple[float, int, dict[str, list[float]]]]
    sql: SqlTimer

    def tick(self) -> TickReport:
        started = time.perf_counter()
        report = super().tick()
        elapsed = time.perf_counter() - started
        self.ticks.append((elapsed, report.published, self.sql.snapshot()))
        return report


@dataclass
class NotifyRound:
    interval_s: float
    total_s: float = 0.0
    start_rollout_s: float = 0.0
    first_s: float = 0.0  # start -> first directive received
    ticks: int = 0  # ticks until the last directive was published
    busy_s: float = 0.0  # time inside those ticks
    prepare_s: float = 0.0
    publish_s: float = 0.0
    received: int = 0
    sample_ok: bool = False
    tick_times: list[float] = field(default_factory=list)
    sql: dict[str, list[float]] = field(default_factory=dict)


def edgefleet_round(
    broker_url: str,
    subscriber: Subscriber,
    admin_url: str | None,
    scratch: Path,
    keys: KeySet,
    devices: int,
    interval_s: float,
    index: int,
) -> NotifyRound:
    result = NotifyRound(interval_s)
    settings = ServerSettings(
        data_dir=scratch,
        trust_path=scratch / "trust.json",
        server_key_path=scratch / "server.key",
        public_url="https://fleet.example.org",
        replica_id="bench-replica",
        driver_interval_s=interval_s,
    )
    trust = make_trust_root(keys)
    with scratch_database(admin_url, scratch) as url:
        db = open_database(url)
        link = ServerLink(
            broker_url, f"bench-server-{index}", "bench", {TopicKind.PRESENCE: _ignore}
        )
        worker: Worker | None = None
        try:
            add_fleet(db, devices, all_online=True)
            link.start()
            if not link.wait_connected(10):
                raise RuntimeError("the server link did not connect")
            publisher = TimedPublisher(CountingPublisher(link))
            issuer = TimedIssuer([keys.server], settings)
            driver = TimedDriver(db, issuer, publisher, settings)
            driver.ticks = []
            driver.sql = SqlTimer(db.engine)
            plan = plan_from_dict(
                {
                    "stages": [{"percent": 100}],
                    "rate_limit_per_minute": max(1, min(1_000_000, devices * 100)),
                }
            )
            subscriber.arm(devices)
            start = time.monotonic()
            with db.session() as session:
                bundle = session.scalars(select(BundleRow)).one()
                start_rollout(session, bundle=bundle, selector={}, plan=plan, actor=OPERATOR)
            result.start_rollout_s = time.monotonic() - start
            worker = driver_worker(driver, settings.driver_interval_s)
            worker.start()
            got = subscriber.result()
        finally:
            if worker is not None:
                worker.stop(60)
            link.stop()
            db.dispose()
    if got.count < devices or got.topics != devices:
        raise RuntimeError(f"edgefleet: the subscriber got {got.count} of {devices}")
    result.total_s = got.last - start
    result.first_s = got.first - start
    result.received = got.count
    published = 0
    for seconds, count, sql in driver.ticks:
        if published >= devices:
            break
        published += count
        result.ticks += 1
        result.busy_s += seconds
        result.tick_times.append(seconds)
        result.sql = sql  # SQL of start_rollout and the ticks until the last directive
    result.prepare_s = issuer.seconds
    result.publish_s = publisher.seconds
    sample_device = got.sample_topic.split("/")[3]
    verify_directive(got.sample, trust, device_id=sample_device, last_sequence=3)
    result.sample_ok = True
    return result


def _ignore(topic: str, payload: bytes) -> None:
    """The link's handler: this bench only publishes."""


# --- the run ------------------------------------------------------------------------------------


def measure(
    scratch: Path, devices: int, rounds: int, intervals: Sequence[float], admin_url: str | None
) -> dict[str, Any]:
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    base = ServerSettings(
        data_dir=scratch,
        trust_path=scratch / "trust.json",
        server_key_path=scratch / "server.key",
        public_url="https://fleet.example.org",
    )
    issuer = DirectiveIssuer([keys.server], base)
    raw: list[float] = []
    ours: dict[float, list[NotifyRound]] = {i: [] for i in intervals}
    config = "persistence false\nmax_inflight_messages 0\n"
    with MosquittoBroker.running(scratch / "mosquitto", extra_config=config) as broker:
        subscriber = Subscriber(broker.url)
        try:
            for index in range(rounds):
                payloads, sign_s = presign(issuer, devices, sequence=4 + index)
                raw.append(raw_round(broker.url, subscriber, payloads))
                for interval in intervals:
                    ours[interval].append(
                        edgefleet_round(
                            broker.url,
                            subscriber,
                            admin_url,
                            scratch,
                            keys,
                            devices,
                            interval,
                            index * len(intervals) + len(ours[interval]),
                        )
                    )
        finally:
            subscriber.close()
    raw_median = statistics.median(raw)
    per_interval = {}
    for interval, results in ours.items():
        median = statistics.median(r.total_s for r in results)
        middle = min(results, key=lambda r: abs(r.total_s - median))
        per_interval[str(interval)] = {
            "totals": [r.total_s for r in results],
            "median": median,
            "ratio": median / raw_median,
            "median_round": middle.__dict__,
        }
    return {
        "devices": devices,
        "rounds": rounds,
        "database": "postgresql" if admin_url else "sqlite",
        "payload_bytes": len(payloads[0][1]),
        "sign_us": sign_s * 1e6,
        "max_directives_per_tick": driver_module.MAX_DIRECTIVES_PER_TICK,
        "default_interval_s": ServerSettings.driver_interval_s,
        "rate_limit_per_minute": max(1, min(1_000_000, devices * 100)),
        "raw_totals": raw,
        "raw_median": raw_median,
        "edgefleet": per_interval,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _s(x: float) -> str:
    return f"{x:.2f} s"


def table(r: dict[str, Any]) -> str:
    n = r["devices"]
    rows: list[tuple[str, ...]] = [("", "edgefleet", "raw paho publisher", "ratio")]
    notes = []
    for interval, e in r["edgefleet"].items():
        m = e["median_round"]
        label = f"driver_interval_s={interval}"
        rows.append(
            (
                f"time to notify {n:,} ({label}, median)",
                _s(e["median"]),
                _s(r["raw_median"]),
                f"{e['ratio']:.1f}x",
            )
        )
        rows.append(
            (
                "  rounds",
                " ".join(f"{x:.2f}" for x in e["totals"]),
                " ".join(f"{x:.2f}" for x in r["raw_totals"]),
                "",
            )
        )
        other = m["busy_s"] - m["prepare_s"] - m["publish_s"]
        idle = m["total_s"] - m["start_rollout_s"] - m["busy_s"]
        notes.append(
            f"{label} (median round): start_rollout {_s(m['start_rollout_s'])}; "
            f"first directive received after {_s(m['first_s'])}; {m['ticks']} ticks to publish "
            f"all, busy {_s(m['busy_s'])} (prepare_install {_s(m['prepare_s'])}, of which "
            f"building+signing ~{_s(r['sign_us'] * n / 1e6)}; publish {_s(m['publish_s'])}; "
            f"other driver/DB work {_s(other)}); between ticks {_s(idle)}; "
            f"slowest tick {_s(max(m['tick_times']))}"
        )
        sql = sorted(m["sql"].items(), key=lambda kv: -kv[1][1])
        in_sql = sum(v[1] for _, v in sql)
        notes.append(
            f"  SQL (start_rollout + those ticks) {_s(in_sql)} of "
            f"{_s(m['start_rollout_s'] + m['busy_s'])}: "
            + "; ".join(f"{kind} {int(v[0]):,}x {_s(v[1])}" for kind, v in sql[:6])
        )
    header = (
        f"{n:,} online devices, one stage of 100%, rate_limit_per_minute "
        f"{r['rate_limit_per_minute']:,} (never throttles); MAX_DIRECTIVES_PER_TICK "
        f"{r['max_directives_per_tick']} (as shipped; default driver_interval_s "
        f"{r['default_interval_s']}); directives of {r['payload_bytes']} bytes at QoS 1 to one "
        f"subscriber on edgefleet/v1/devices/+/directive; mosquitto; {r['database']}; "
        f"python {r['python']}, {r['cpus']} CPUs; rounds alternate; timed from start_rollout "
        "(edgefleet) or the first publish (raw) to the last directive received"
    )
    floor = math.ceil(n / r["max_directives_per_tick"])
    footer = (
        f"cap: {n:,} / {r['max_directives_per_tick']} per tick = {floor} ticks, run back to back "
        f"while a stage has more to notify; signing costs {r['sign_us']:.0f} us per "
        "directive (pydantic build + canonical JSON + Ed25519)"
    )
    return "\n".join([header, format_columns(rows, rule=True), *notes, footer])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--intervals",
        default="1,0",
        help="driver_interval_s values to drive with, comma-separated (default: 1,0)",
    )
    parser.add_argument(
        "--db", help="PostgreSQL URL of a role that may CREATE DATABASE (default: SQLite)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-notify-") as scratch:
        result = measure(Path(scratch), args.devices, args.rounds, intervals, args.db)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
