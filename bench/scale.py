"""Benchmark: a fleet of simulated devices against one server (SQLite) or replicas (PostgreSQL).

Setup, in one run and a temporary directory: keys (`edgefleet keys init`); a model trained
on scikit-learn's digits (`edgefleet.demo.model`), converted for this machine and signed
(`edgefleet convert --target host --sign`) as digits@1.1.0; mosquitto on a free port
(no persistence, no queue limit, no connection limit); --replicas `edgefleet server run`
processes sharing the database and the broker (SQLite in the data directory, or a fresh
PostgreSQL database made on --db's server); --devices simulated devices in `edgefleet
simulate` processes of --per-process devices each, every device serving digits@1.0.0 from
the start (`--serving`), so that each sends a telemetry window a minute and a heartbeat
every 30 s throughout. The simulators enroll through the replicas in turn, with
`--forwarded-for` (the servers get `--forwarded-allow-ips 127.0.0.1`): the per-address
enrollment limit then applies per device, as behind a load balancer.

Measured:
- enrollment: from starting the simulators until every device is enrolled, then online;
- a 3-stage rollout of digits@1.1.0 (1% -> 10% -> 100%, --bake-seconds per stage, the
  plan's rate limit --rate-per-minute, by default the whole fleet in a minute: the default
  600 a minute alone makes 10,000 devices take 17 minutes) until `completed`, every device
  downloading the bundle over HTTP and verifying it;
- ingest: the fleet runs --ingest-seconds more after the rollout; then the simulators stop
  (each says how many windows it sent) and the windows stored (telemetry_buckets.windows)
  must reach that count; lag = how long after the simulators stopped that took;
- CPU seconds and peak RSS of every server replica and of mosquitto, over the whole run;
  with PostgreSQL on this machine, the CPU seconds of its server's processes too (every
  database on it counts: run nothing else against it).

Raw baselines, in the same run, once the fleet has stopped:
- raw broker: as many signed telemetry windows as the fleet sent (the simulator's windows),
  published with paho to a bare subscriber on the same mosquitto (bench/server_ingest.py's
  raw round): the most this broker and machine carry, in messages/s;
- raw SQL: as many telemetry_buckets rows inserted straight into a fresh database of the
  same kind, in transactions the size of the server's one-second flush: rows/s.
The fleet's ingest rate is printed beside each as a ratio (its share of that capacity).

Goals (exit status 1 when one is missed): every device enrolled and online, the rollout
completed, every window sent stored (none lost) within --max-lag seconds, and every
bucket's running sums its own counts added to those of the buckets before it (the
replicas write one device's windows in turn).

    PYTHONPATH=. .venv-test/bin/python bench/scale.py [--devices 10000] [--per-process 2500] \
        [--db sqlite | --db postgresql+psycopg://USER:PASS@HOST/postgres --replicas 2] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import func, insert, or_, select, text
from sqlalchemy.engine import make_url

from bench.server_ingest import build_frames, raw_round
from edgefleet.demo.fleet import DemoError, Processes, free_ports, wait_for
from edgefleet.demo.model import load_digits, write_model
from edgefleet.profiles import host_profile
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import TelemetryBucket
from edgefleet.server.spans import FRACTIONAL, RUNNING, SUMMED
from edgefleet.simulate.device import SimDevice, telemetry_window
from edgefleet.tables import format_columns
from tests.server.test_ingest import enroll

BUNDLE, SERVING, ROLLED_OUT = "digits", "1.0.0", "1.1.0"
STAGES = [{"percent": 1}, {"percent": 10}, {"percent": 100}]
TELEMETRY_S = 60.0
HEARTBEAT_S = 30.0
PAGE_S = 2.0  # how often the bench looks at the fleet
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name; fields[0] is the state (stat's third field)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


@dataclass
class Usage:
    """CPU seconds and peak resident memory of one process, sampled from /proc."""

    name: str
    pid: int
    cpu_start: float | None = None
    cpu_last: float = 0.0
    rss_peak: int = 0

    def sample(self) -> None:
        try:
            cpu = self.cpu_now()
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return  # it ended: keep the last sample
        if self.cpu_start is None:
            self.cpu_start = cpu
        self.cpu_last = cpu
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        if found:
            self.rss_peak = max(self.rss_peak, int(found.group(1)) * 1024)

    def cpu_now(self) -> float:
        fields = stat_fields(self.pid)
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    @property
    def cpu_s(self) -> float:
        return 0.0 if self.cpu_start is None else self.cpu_last - self.cpu_start


@dataclass
class ServerTreeUsage(Usage):
    """CPU seconds of a database server's process tree: the postmaster, its backends and
    workers running, and those that ended (the children's time the postmaster has reaped).
    Every database of that server counts, not only the bench's. No memory figure: the
    processes share their buffers, so their resident sizes do not add up."""

    def cpu_now(self) -> float:
        fields = stat_fields(self.pid)
        # utime, stime, and cutime, cstime: children that ended, reaped by the postmaster
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14))
        for child in children(self.pid):
            try:
                child_fields = stat_fields(child)
            except OSError:
                continue  # ended since the listing: the next sample has it in cutime
            cpu += int(child_fields[11]) + int(child_fields[12])
        return cpu / CLOCK_TICKS

    def sample(self) -> None:
        super().sample()
        self.rss_peak = 0


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(stat_fields(int(entry.name))[1]) == pid:  # ppid
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's postmaster, when it runs on this machine (None otherwise)."""
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            backend = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        parent = int(stat_fields(backend)[1])
        return parent if "postgres" in Path(f"/proc/{parent}/cmdline").read_text() else None
    except OSError:
        return None  # a server elsewhere: its processes are not ours to read
    finally:
        db.dispose()


@dataclass
class Monitor:
    """Samples every watched process each second on a thread of its own."""

    usages: list[Usage] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, name: str, pid: int, kind: type[Usage] = Usage) -> None:
        usage = kind(name, pid)
        usage.sample()
        self.usages.append(usage)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for usage in list(self.usages):
                usage.sample()

    def stop(self) -> None:
        self._stop.set()
        for usage in self.usages:
            usage.sample()


class Mosquitto:
    """mosquitto on a free port: anonymous, no persistence, no queue or connection limit."""

    def __init__(self, directory: Path, port: int) -> None:
        directory.mkdir(parents=True)
        executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_connections -1\n"
            f"log_dest file {directory}/mosquitto.log\nlog_type error\nlog_type warning\n"
        )
        self.url = f"mqtt://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [executable, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def databases(db: str, work: Path) -> Iterator[tuple[str, str]]:
    """The server's database URL and the raw SQL baseline's (fresh; PostgreSQL's dropped after)."""
    if db == "sqlite":
        (work / "server").mkdir()
        yield f"sqlite:///{work / 'server' / 'server.db'}", f"sqlite:///{work / 'raw.db'}"
        return
    admin = Database(db)
    names = [f"edgefleet_scale_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    try:
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in names:
                conn.execute(text(f"CREATE DATABASE {name}"))
        urls = [make_url(db).set(database=n).render_as_string(hide_password=False) for n in names]
        yield urls[0], urls[1]
    finally:
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in names:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def raise_file_limit(devices: int) -> None:
    """Each simulated device holds three descriptors, mosquitto one per device: raise ours."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 4 * devices + 1024)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def convert_bundle(processes: Processes, work: Path, keys: Path) -> Path:
    digits = load_digits()
    write_model(work / "model.onnx", digits.train, digits.train_labels)
    np.savez(work / "calibration.npz", features=digits.train[:200])
    np.savez(work / "validation.npz", features=digits.held_out)
    np.save(work / "labels.npy", digits.held_out_labels)
    bundle = work / f"{BUNDLE}-{ROLLED_OUT}.efb"
    processes.command(
        "convert", work / "model.onnx", "--target", "host",
        "--calibration", work / "calibration.npz", "--validation", work / "validation.npz",
        "--labels", work / "labels.npy", "--sign", keys / "release.key",
        "--name", BUNDLE, "--version", ROLLED_OUT, "-o", bundle,
    )  # fmt: skip
    return bundle


def stored_windows(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.sum(TelemetryBucket.windows))) or 0)


def broken_running_sums(db: Database) -> int:
    """Buckets whose running sums of the counting columns are not their own counts added to
    those of every earlier bucket of their device and version (nothing is deleted by
    retention in a run)."""
    bucket = TelemetryBucket
    earlier = {
        "partition_by": (bucket.device_id, bucket.bundle_name, bucket.bundle_version),
        "order_by": bucket.bucket_start,
    }
    # The counts; the sums of regression errors are floats, added in another order.
    counted = [name for name in SUMMED if name not in FRACTIONAL]
    offsets = select(
        *(
            (
                getattr(bucket, RUNNING[name]) - func.sum(getattr(bucket, name)).over(**earlier)
            ).label(name)
            for name in counted
        )
    ).subquery()
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count()).where(or_(*(offsets.c[name] != 0 for name in counted)))
            )
            or 0
        )


def sent_windows(logs: list[Path]) -> int:
    """The telemetry windows the simulators' summary lines say they sent."""
    total = 0
    for log in logs:
        found = re.search(r"(\d+) telemetry windows", log.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"no summary line in {log}")
        total += int(found.group(1))
    return total


def raw_broker_rate(broker_url: str, messages: int, work: Path) -> float:
    """Messages/s of the simulator's telemetry windows through the broker to a bare subscriber."""
    devices = [SimDevice(f"raw-{i:05d}") for i in range(min(messages, 1000))]
    frames = work / "frames.bin"
    build_frames(devices, messages, frames, 0)
    return raw_round(broker_url, frames, messages, 2)


def raw_sql_rate(url: str, rows: int, batch: int) -> float:
    """Rows/s of telemetry buckets inserted straight into a fresh database, `batch` a commit."""
    db = open_database(url)
    try:
        devices = [SimDevice(f"raw-{i:05d}") for i in range(min(rows, 1000))]
        enroll(db, devices)
        window = telemetry_window("raw", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
        bins = {
            "inputs": {k: v.model_dump() for k, v in window.inputs.items()},
            "outputs": {k: v.model_dump() for k, v in window.outputs.items()},
        }
        start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        values = [
            {
                "device_id": devices[i % len(devices)].id,
                "bundle_name": BUNDLE,
                "bundle_version": SERVING,
                "bucket_start": start + dt.timedelta(minutes=5 * (i // len(devices))),
                "windows": 1,
                "requests": window.requests,
                "latency": window.latency.model_dump(),
                "bins": bins,
            }
            for i in range(rows)
        ]
        began = time.perf_counter()
        for offset in range(0, rows, batch):
            with db.session() as session:
                session.execute(insert(TelemetryBucket), values[offset : offset + batch])
        return rows / (time.perf_counter() - began)
    finally:
        db.dispose()


def run(args: argparse.Namespace, work: Path, figures: dict[str, Any]) -> list[str]:
    """The whole benchmark; the goals it missed."""
    missed: list[str] = []
    fleet = Processes(work)
    simulators = Processes(work)
    monitor = Monitor()
    keys = work / "keys"
    fleet.command("keys", "init", keys)
    bundle = convert_bundle(fleet, work, keys)
    profile = host_profile().name
    mqtt_port, *api_ports = free_ports(1 + args.replicas)
    broker = Mosquitto(work / "broker", mqtt_port)
    try:
        with databases(args.db, work) as (db_url, raw_url):
            monitor.watch("mosquitto", broker.process.pid)
            postmaster = None if args.db == "sqlite" else postmaster_pid(db_url)
            if postmaster is not None:
                monitor.watch("PostgreSQL (every database)", postmaster, ServerTreeUsage)
            urls = [f"http://127.0.0.1:{port}" for port in api_ports]
            for index, port in enumerate(api_ports):
                server = fleet.start(
                    work / f"server-{index}.log", "server", "run", "--db", db_url,
                    "--mqtt", broker.url, "--data", work / "server", "--port", str(port),
                    "--trust", keys / "trust.json", "--server-key", keys / "server.key",
                    "--forwarded-allow-ips", "127.0.0.1", "--replica-name", f"replica-{index}",
                )  # fmt: skip
                monitor.watch(f"server {index + 1}", server.pid)
            monitor.start()
            for url in urls:
                wait_for(f"healthy server at {url}", functools.partial(healthy, url), 120, fleet)
            token = fleet.command(
                "server", "token", "create", "--role", "operator", "--name", "scale",
                "--db", db_url,
            ).strip()  # fmt: skip
            api = httpx.Client(
                base_url=f"{urls[0]}/api/v1",
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            )
            pushed = api.post(
                "/bundles",
                content=bundle.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            pushed.raise_for_status()
            made = api.post("/enroll-tokens", json={"max_uses": args.devices, "ttl_s": 7200})
            made.raise_for_status()
            claim = made.json()["token"]

            # -- enrollment ------------------------------------------------------------
            logs = []
            began = time.monotonic()
            counts = split(args.devices, args.per_process)
            for index, count in enumerate(counts):
                log = work / f"simulate-{index}.log"
                logs.append(log)
                simulator = simulators.start(
                    log, "simulate", "--devices", str(count), "--server", urls[index % len(urls)],
                    "--mqtt", broker.url, "--trust", keys / "trust.json", "--enroll-token", claim,
                    "--profile", profile, "--serving", f"{BUNDLE}@{SERVING}", "--forwarded-for",
                    "--prefix", f"sim{index}", "--heartbeat-seconds", str(HEARTBEAT_S),
                    "--telemetry-seconds", str(TELEMETRY_S),
                )  # fmt: skip
                monitor.watch(f"simulator {index + 1} ({count} devices)", simulator.pid)

            def enrolled_all() -> bool:
                return all("devices enrolled with" in log.read_text() for log in logs)

            wait_for("enrollment of every device", enrolled_all, args.timeout, simulators)
            figures["enroll_s"] = time.monotonic() - began

            def online() -> int:
                return int(api.get("/devices", params={"online": True, "limit": 1}).json()["total"])

            wait_for("every device online", lambda: online() == args.devices, args.timeout,
                     simulators)  # fmt: skip
            figures["online_s"] = time.monotonic() - began
            print(f"{args.devices} devices enrolled in {figures['enroll_s']:.0f} s, "
                  f"online after {figures['online_s']:.0f} s", file=sys.stderr)  # fmt: skip

            # -- the rollout -----------------------------------------------------------
            plan = {
                "stages": STAGES,
                "gates": {"bake_s": args.bake_seconds},
                "rate_limit_per_minute": args.rate_per_minute or args.devices,
            }
            started = api.post("/rollouts", json={"bundle": f"{BUNDLE}@{ROLLED_OUT}", "plan": plan})
            started.raise_for_status()
            rollout = started.json()["id"]
            began = time.monotonic()
            status: dict[str, Any] = {}

            def rollout_ended() -> bool:
                nonlocal status
                status = api.get(f"/rollouts/{rollout}").json()
                return status["state"] in ("completed", "aborted", "paused")

            try:
                wait_for("end of the rollout", rollout_ended, args.rollout_timeout, simulators)
                figures["rollout_state"] = status["state"]
            except DemoError:  # still running: measure the rest, report where it was
                figures["rollout_state"] = f"{status['state']}, not ended"
            figures["rollout_s"] = time.monotonic() - began
            figures["rollout_devices"] = {k: n for k, n in status["devices"].items() if n}
            print(f"rollout {status['state']} in {figures['rollout_s']:.0f} s: "
                  f"{status['devices']}", file=sys.stderr)  # fmt: skip
            if status["state"] != "completed":
                missed.append(f"the rollout was {figures['rollout_state']}, not completed")

            # -- ingest ----------------------------------------------------------------
            store = Database(db_url)
            try:
                stored_before = stored_windows(store)
                time.sleep(args.ingest_seconds)
                simulators.check_running()
                stored_after = stored_windows(store)
                figures["ingest_rate"] = (stored_after - stored_before) / args.ingest_seconds
                simulators.stop()
                stopped = time.monotonic()
                sent = sent_windows(logs)
                while stored_windows(store) < sent and time.monotonic() - stopped < args.max_lag:
                    time.sleep(0.2)
                figures["lag_s"] = time.monotonic() - stopped
                figures["sent"], figures["stored"] = sent, stored_windows(store)
                figures["broken_running_sums"] = broken_running_sums(store)
            finally:
                store.dispose()
            if figures["stored"] != sent:
                missed.append(
                    f"{figures['stored']} of {sent} windows stored {args.max_lag:.0f} s "
                    "after the simulators stopped"
                )
            if figures["broken_running_sums"]:
                missed.append(
                    f"{figures['broken_running_sums']} buckets whose running sums are not "
                    "their buckets' counts added up"
                )
            monitor.stop()
            figures["usage"] = {
                u.name: {"cpu_s": u.cpu_s, "rss_peak_mb": u.rss_peak / 1e6} for u in monitor.usages
            }
            fleet.stop()

            # -- raw baselines, same broker and database kind --------------------------
            figures["raw_broker_rate"] = raw_broker_rate(broker.url, sent, work)
            flush_rows = max(1, math.ceil(args.devices / TELEMETRY_S))
            figures["raw_sql_rate"] = raw_sql_rate(raw_url, sent, flush_rows)
    finally:
        monitor.stop()
        simulators.stop()
        fleet.stop()
        broker.stop()
    return missed


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def split(devices: int, per_process: int) -> list[int]:
    """`devices` over as few processes of at most `per_process` as it takes, evenly."""
    processes = math.ceil(devices / per_process)
    return [devices // processes + (i < devices % processes) for i in range(processes)]


def report(args: argparse.Namespace, figures: dict[str, Any], missed: list[str]) -> None:
    offered = args.devices / TELEMETRY_S
    rate = figures.get("ingest_rate", 0.0)
    rows = [
        ["enrollment", f"{args.devices} devices in {figures['enroll_s']:.0f} s "
         f"({args.devices / figures['enroll_s']:.0f}/s); all online at {figures['online_s']:.0f} s",
         "", ""],
        ["rollout 1% -> 10% -> 100%", f"{figures['rollout_state']} in "
         f"{figures['rollout_s']:.0f} s: {figures['rollout_devices']} "
         f"({args.bake_seconds:.0f} s bake a stage, at most "
         f"{args.rate_per_minute or args.devices} directives a minute)", "", ""],
        ["ingest", f"{figures['stored']} of {figures['sent']} windows stored, last "
         f"{figures['lag_s']:.1f} s after the simulators stopped; {rate:.0f} windows/s "
         f"(offered {offered:.0f}/s); buckets with running sums off: "
         f"{figures['broken_running_sums']}", "", ""],
        ["raw broker", "", f"{figures['raw_broker_rate']:.0f} msg/s",
         f"{rate / figures['raw_broker_rate']:.2%}"],
        ["raw SQL", "", f"{figures['raw_sql_rate']:.0f} rows/s",
         f"{rate / figures['raw_sql_rate']:.2%}"],
    ]  # fmt: skip
    for name, usage in figures["usage"].items():
        memory = f", peak RSS {usage['rss_peak_mb']:.0f} MB" if usage["rss_peak_mb"] else ""
        rows.append([name, f"{usage['cpu_s']:.0f} CPU s{memory}", "", ""])
    print(
        f"{args.devices} simulated devices, {args.replicas} server replica(s) on "
        f"{'SQLite' if args.db == 'sqlite' else 'PostgreSQL'}, mosquitto; "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        format_columns(
            [["measure", "edgefleet", "raw baseline", "edgefleet / raw"], *rows], rule=True
        )
    )
    for goal in missed:
        print(f"MISSED: {goal}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--per-process", type=int, default=2500, help="devices per simulator")
    parser.add_argument(
        "--db",
        default="sqlite",
        help="sqlite, or a PostgreSQL server URL on which the bench creates its databases",
    )
    parser.add_argument("--replicas", type=int, help="server replicas (default: 1; PostgreSQL 2)")
    parser.add_argument("--bake-seconds", type=float, default=10.0)
    parser.add_argument(
        "--rate-per-minute",
        type=int,
        help="the plan's rate_limit_per_minute (default: --devices, the whole fleet in a minute)",
    )
    parser.add_argument("--ingest-seconds", type=float, default=180.0)
    parser.add_argument("--max-lag", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on enrollment")
    parser.add_argument(
        "--rollout-timeout",
        type=float,
        default=900.0,
        help="after this, the rollout's progress is reported and the run goes on",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.replicas is None:
        args.replicas = 1 if args.db == "sqlite" else 2
    if args.db == "sqlite" and args.replicas != 1:
        parser.error("SQLite serves one replica: give --db postgresql://... for several")
    raise_file_limit(args.devices)
    work = Path(tempfile.mkdtemp(prefix="efscale-"))
    figures: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    try:
        missed = run(args, work, figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"figures": figures, "missed": missed}, indent=2, default=str))
    else:
        report(args, figures, missed)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
