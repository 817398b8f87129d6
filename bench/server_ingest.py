"""Benchmark: the fleet server's MQTT ingest rate against a raw paho subscriber on the same broker.

Setup, in one run: a mosquitto on a free port (persistence off, `max_queued_messages 0`
so the broker never drops a message for a slow subscriber, `max_inflight_messages 0`),
--devices simulated devices enrolled in a fresh SQLite database, and --messages signed
telemetry windows (the fleet simulator's windows: 2 input features and 1 output of 10
bins, a 5-bound latency histogram; each frame signed with its device's Ed25519 key, as
the agent sends them) built once before any timing. A child process (a separate
interpreter, so the publisher does not share our GIL) publishes them at QoS 1 as fast as
paho goes over --publishers connections. Rounds alternate between:

- raw: a bare paho MQTT 5 subscriber on the server's own filter
  (`$share/<group>.telemetry/edgefleet/v1/devices/+/telemetry`, QoS 1) that only counts;
  timed from its first message to its last. This is the peer: the most a Python
  subscriber on this broker and machine receives.
- edgefleet: `ServerLink` + `Ingestor` (signature check against the enrolled key from
  `DeviceKeyCache`, schema validation, dedupe, merging into telemetry buckets, flush
  thread writing the database every telemetry_flush_s); timed from the first message
  received until every message is accepted AND written to the database (a last flush is
  triggered as soon as the last one is accepted).

In both, the main thread blocks while the messages flow (it does not poll), and what
was set up before the publisher starts is frozen out of the garbage collector's scans
(`gc.freeze()`), as the server's runner does after its start-up.

Figures are medians over --rounds rounds of each; the goal is edgefleet / raw >= 0.6.
Exit status 1 when the goal is missed (or a message went missing).

    PYTHONPATH=. .venv-test/bin/python bench/server_ingest.py [--devices 200] \
        [--messages 20000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from edgefleet.mqtt.devicesig import sign_device_payload
from edgefleet.mqtt.messages import encode_message
from edgefleet.mqtt.topics import DeviceTopics, TopicKind, device_filter, shared_filter
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import TelemetryBucket
from edgefleet.server.devices import DeviceKeyCache
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.tables import format_columns
from tests.agent.broker import MosquittoBroker, host_port
from tests.server.fleet import SimDevice, make_devices, telemetry_window
from tests.server.test_ingest import enroll, make_settings

GOAL = 0.6
REPLICA_FLUSH_S = 0.25  # the parent sees the end only when a replica has flushed
GROUP = "bench"
ROUND_TIMEOUT_S = 300.0
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

PUBLISHER = r"""
import struct, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
index, processes = int(sys.argv[4]), int(sys.argv[5])
frames = []
with open(path, "rb") as handle:
    data = handle.read()
offset = 0
while offset < len(data):
    tlen, plen = struct.unpack_from(">HI", data, offset)
    offset += 6
    topic = data[offset : offset + tlen].decode()
    offset += tlen
    frames.append((topic, data[offset : offset + plen]))
    offset += plen
frames = frames[index::processes]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}", protocol=mqtt.MQTTv5)
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect(host, port, 60)
c.loop_start()
time.sleep(0.3)
print("ready", flush=True)
sys.stdin.readline()
infos = [c.publish(t, p, qos=1) for t, p in frames]
for info in infos:
    info.wait_for_publish(120)
c.disconnect()
c.loop_stop()
print("done", flush=True)
"""


def build_frames(devices: list[SimDevice], messages: int, path: Path, round_index: int) -> None:
    """Signed telemetry frames, unique window per device, written length-prefixed to `path`."""
    with path.open("wb") as out:
        for i in range(messages):
            device = devices[i % len(devices)]
            start = T0 + dt.timedelta(days=round_index, minutes=i // len(devices))
            topic = DeviceTopics(device.id).telemetry
            payload = encode_message(telemetry_window(device.id, start, errors=i % 3))
            frame = sign_device_payload(topic, payload, device.key)
            raw_topic = topic.encode()
            out.write(struct.pack(">HI", len(raw_topic), len(frame)) + raw_topic + frame)


class Publisher:
    """The child processes that publish the frames (a share each) when told to."""

    def __init__(self, frames: Path, url: str, n: int) -> None:
        host, port = host_port(url)
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", PUBLISHER, str(frames), host, str(port), str(i), str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(n)
        ]
        for process in self.processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a publisher did not start")

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    def wait(self) -> None:
        for process in self.processes:
            assert process.stdout is not None
            process.stdout.readline()
            process.wait(ROUND_TIMEOUT_S)


class RawSubscriber:
    """A bare paho subscriber that counts what arrives, with the time of the first and last."""

    def __init__(self, url: str) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *a: c.subscribe(
            shared_filter(f"{GROUP}.telemetry", device_filter(TopicKind.TELEMETRY)), 1
        )
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        host, port = host_port(url)
        self.client.connect(host, port, 60)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("raw subscriber did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_round(url: str, frames: Path, messages: int, publishers: int) -> float:
    subscriber = RawSubscriber(url)
    publisher = Publisher(frames, url, publishers)
    gc.freeze()  # as in edgefleet_round
    try:
        publisher.go()
        publisher.wait()
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while subscriber.count < messages and time.monotonic() < deadline:
            time.sleep(0.01)
        if subscriber.count != messages:
            raise RuntimeError(f"raw subscriber got {subscriber.count} of {messages}")
        return messages / (subscriber.last - subscriber.first)
    finally:
        subscriber.close()


def edgefleet_round(
    url: str,
    frames: Path,
    messages: int,
    publishers: int,
    scratch: Path,
    devices: list[SimDevice],
    workers: int = 1,
) -> tuple[float, dict[str, Any]]:
    db = open_database(f"sqlite:///{scratch / f'round-{time.monotonic_ns()}.db'}")
    enroll(db, devices)
    ingestor = Ingestor(db, DeviceKeyCache(db), make_settings(scratch))
    first: list[float] = []
    all_accepted = threading.Event()

    def handle(topic: str, payload: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        ingestor.handle(topic, payload)
        if ingestor.counts["telemetry"] >= messages:
            all_accepted.set()

    link = ServerLink(
        url,
        "bench-server",
        GROUP,
        {TopicKind.TELEMETRY: handle},
        when_stored=ingestor.when_stored,  # acknowledged once stored, as in the server
        workers=workers,
    )
    link.start()
    ingestor.start()
    try:
        if not link.wait_connected(10):
            raise RuntimeError("the server link did not connect")
        publisher = Publisher(frames, url, publishers)
        # What was built so far lives through the round: out of the collector's scans, as
        # the server's runner does after its start-up (server/runner.py).
        gc.freeze()
        publisher.go()
        # Blocked, not polling, while messages flow (as the raw round's main thread is):
        # a poll every few ms would take the GIL from the threads being measured.
        all_accepted.wait(ROUND_TIMEOUT_S)
        ingestor.flush()
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while ingestor.flushed_messages < messages and time.monotonic() < deadline:
            time.sleep(0.002)
        end = time.perf_counter()
        publisher.wait()
        if ingestor.flushed_messages != messages:
            raise RuntimeError(f"edgefleet flushed {ingestor.flushed_messages} of {messages}")
        with db.session() as session:
            stored = session.scalar(select(func.sum(TelemetryBucket.windows)))
        if stored != messages:
            raise RuntimeError(f"the database holds {stored} windows of {messages}")
        stats = {"flushes": ingestor.flushes}
        return messages / (end - first[0]), stats
    finally:
        link.stop()
        ingestor.stop()
        db.dispose()


def replica_child(url: str, db_url: str) -> None:
    """Run in a child process: one server replica's link and ingestor until stdin closes."""
    db = Database(db_url)
    settings = make_settings(Path(tempfile.gettempdir()), telemetry_flush_s=REPLICA_FLUSH_S)
    ingestor = Ingestor(db, DeviceKeyCache(db), settings)
    first: list[float] = []

    def handle(topic: str, payload: bytes) -> None:
        if not first:
            first.append(time.monotonic())
            print(f"first {first[0]}", flush=True)
        ingestor.handle(topic, payload)

    link = ServerLink(url, f"bench-replica-{os.getpid()}", GROUP, {TopicKind.TELEMETRY: handle})
    link.start()
    ingestor.start()
    gc.freeze()  # as the server's runner does after its start-up
    if link.wait_connected(10):
        print("ready", flush=True)
    sys.stdin.read()
    link.stop()
    ingestor.stop()
    db.dispose()


def replicas_round(
    url: str,
    frames: Path,
    messages: int,
    publishers: int,
    scratch: Path,
    devices: list[SimDevice],
    replicas: int,
) -> float:
    """`replicas` server processes in one share group, on one database (SQLite, WAL)."""
    db_url = f"sqlite:///{scratch / f'replicas-{time.monotonic_ns()}.db'}"
    db = open_database(db_url)
    enroll(db, devices)
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--replica-child", url, db_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        for _ in range(replicas)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a replica did not connect")
        publisher = Publisher(frames, url, publishers)
        publisher.go()
        firsts = []
        for child in children:
            assert child.stdout is not None
            firsts.append(float(child.stdout.readline().split()[1]))
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        stored = 0
        while stored < messages and time.monotonic() < deadline:
            time.sleep(0.01)
            with db.session() as session:
                stored = session.scalar(select(func.sum(TelemetryBucket.windows))) or 0
        end = time.monotonic()
        publisher.wait()
        if stored != messages:
            raise RuntimeError(f"the replicas stored {stored} windows of {messages}")
        return messages / (end - min(firsts))
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(30)
        db.dispose()


def measure(
    scratch: Path,
    devices_n: int,
    messages: int,
    rounds: int,
    publishers: int,
    replicas: int,
) -> dict[str, Any]:
    devices = make_devices(devices_n, "bench")
    raw: list[float] = []
    ours: list[float] = []
    scaled: list[float] = []
    stats: list[dict[str, Any]] = []
    config = "persistence false\nmax_inflight_messages 0\n"
    with MosquittoBroker.running(scratch / "mosquitto", extra_config=config) as broker:
        for index in range(rounds):
            frames = scratch / f"frames-{index}.bin"
            build_frames(devices, messages, frames, index)
            raw.append(raw_round(broker.url, frames, messages, publishers))
            rate, info = edgefleet_round(broker.url, frames, messages, publishers, scratch, devices)
            ours.append(rate)
            stats.append(info)
            if replicas > 1:
                scaled.append(
                    replicas_round(
                        broker.url, frames, messages, publishers, scratch, devices, replicas
                    )
                )
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    return {
        "devices": devices_n,
        "messages": messages,
        "rounds": rounds,
        "publishers": publishers,
        "frame_bytes": len(
            sign_device_payload(
                DeviceTopics(devices[0].id).telemetry,
                encode_message(telemetry_window(devices[0].id, T0)),
                devices[0].key,
            )
        ),
        "raw_rates": raw,
        "edgefleet_rates": ours,
        "raw_median": raw_median,
        "edgefleet_median": ours_median,
        "ratio": ours_median / raw_median,
        "goal": GOAL,
        "goal_met": ours_median / raw_median >= GOAL,
        "edgefleet_stats": stats,
        "replicas": replicas,
        "replicas_rates": scaled,
        "replicas_median": statistics.median(scaled) if scaled else None,
        "replicas_ratio": statistics.median(scaled) / raw_median if scaled else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        ("", "edgefleet ingest", "raw paho subscriber", "ratio", "goal", "met"),
        (
            "telemetry msg/s (median)",
            f"{r['edgefleet_median']:,.0f}",
            f"{r['raw_median']:,.0f}",
            f"{r['ratio']:.2f}",
            f">= {r['goal']}",
            "yes" if r["goal_met"] else "NO",
        ),
        (
            "rounds",
            " ".join(f"{x:,.0f}" for x in r["edgefleet_rates"]),
            " ".join(f"{x:,.0f}" for x in r["raw_rates"]),
            "",
            "",
            "",
        ),
    ]
    if r["replicas_rates"]:
        rows.append(
            (
                f"{r['replicas']} replicas (processes)",
                f"{r['replicas_median']:,.0f} ("
                + " ".join(f"{x:,.0f}" for x in r["replicas_rates"])
                + ")",
                f"{r['raw_median']:,.0f}",
                f"{r['replicas_ratio']:.2f}",
                "(information)",
                "-",
            )
        )
    header = (
        f"{r['messages']} signed telemetry windows ({r['frame_bytes']} bytes) from "
        f"{r['devices']} devices over {r['publishers']} connection(s), QoS 1, mosquitto; "
        f"python {r['python']}, {r['cpus']} CPUs; rounds alternate; edgefleet = ServerLink + "
        "Ingestor, accepted and written to SQLite"
    )
    return header + "\n" + format_columns(rows, rule=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="also measure this many server processes in one share group (1: skip)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--replica-child", nargs=2, metavar=("URL", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica_child:
        replica_child(*args.replica_child)
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as scratch:
        result = measure(
            Path(scratch), args.devices, args.messages, args.rounds, args.publishers, args.replicas
        )
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
