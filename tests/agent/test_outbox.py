"""Store-and-forward: the bounded on-disk outbox alone, then through the link and a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox, outbox_is_empty
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.errors import UsageError
from edgefleet.mqtt import (
    BinCounts,
    LatencyHistogram,
    StatusReport,
    TelemetryWindow,
    encode_message,
    parse_message,
)
from edgefleet.mqtt.topics import TopicKind
from tests.agent.broker import MosquittoBroker, Observer, unique_device_id

SENT = "2030-01-02T03:04:05Z"


def status(device_id: str, sequence: int) -> StatusReport:
    return StatusReport(
        device_id=device_id, sent_at=SENT, sequence=sequence, install_state="downloading"
    )


def telemetry(device_id: str, requests: int) -> TelemetryWindow:
    return TelemetryWindow(
        device_id=device_id,
        window_start="2030-01-02T03:00:00Z",
        window_end="2030-01-02T03:01:00Z",
        bundle_name="demo",
        bundle_version="1.2.3",
        requests=requests,
        errors=0,
        fallbacks=0,
        schema_violations=0,
        latency=LatencyHistogram(bounds_ms=[1.0, 10.0], counts=[requests, 0, 0]),
        inputs={"x": BinCounts(counts=[1] * 200, nan=0, below=0, above=0)},
        outputs={},
    )


def kinds_and_payloads(outbox: Outbox) -> list[tuple[TopicKind, bytes]]:
    return [(entry.kind, entry.read()) for entry in outbox.entries()]


# -- the outbox alone ------------------------------------------------------------------------


def test_messages_come_back_in_order_after_a_restart(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 1 << 20)
    puts = [(TopicKind.STATUS, b"s1"), (TopicKind.TELEMETRY, b"t1"), (TopicKind.STATUS, b"s2")]
    for kind, payload in puts:
        outbox.put(kind, payload)
    (tmp_path / ".000000000009.status.msg.abc.tmp").write_bytes(b"half")  # a cut write
    reopened = Outbox(tmp_path, 1 << 20)
    assert kinds_and_payloads(reopened) == puts
    assert reopened.size_bytes == 6 and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert reopened.put(TopicKind.STATUS, b"s3") == 4


def test_bound_drops_oldest_telemetry_counts_it_and_never_drops_status(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 100)
    outbox.put(TopicKind.TELEMETRY, b"a" * 30)
    outbox.put(TopicKind.STATUS, b"S" * 30)
    outbox.put(TopicKind.TELEMETRY, b"b" * 30)
    outbox.put(TopicKind.TELEMETRY, b"c" * 30)  # over 100: "a" goes
    assert [p[:1] for _, p in kinds_and_payloads(outbox)] == [b"S", b"b", b"c"]
    outbox.put(TopicKind.STATUS, b"T" * 90)  # status always fits: both windows go
    assert [p[:1] for _, p in kinds_and_payloads(outbox)] == [b"S", b"T"]
    assert outbox.size_bytes == 120  # over the bound, with status reports only
    assert outbox.put(TopicKind.TELEMETRY, b"d" * 10) is None  # no room: the new one goes
    assert outbox.dropped_count == 4
    assert Outbox(tmp_path, 100).dropped_count == 4  # the count survives a restart
    assert outbox.take_dropped_count() == 4
    assert outbox.take_dropped_count() == 0 and Outbox(tmp_path, 100).dropped_count == 0


def test_telemetry_in_flight_is_not_dropped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 100)
    outbox.put(TopicKind.TELEMETRY, b"a" * 40)
    outbox.put(TopicKind.TELEMETRY, b"b" * 40)
    assert [e.seq for e in outbox.take_pending(1)] == [1]  # the broker may have it already
    outbox.put(TopicKind.TELEMETRY, b"c" * 40)
    assert [p[:1] for _, p in kinds_and_payloads(outbox)] == [b"a", b"c"]
    assert [e.seq for e in outbox.take_pending(10)] == [3]
    outbox.release_in_flight()
    assert [e.seq for e in outbox.take_pending(10)] == [1, 3]
    outbox.remove(1)
    outbox.remove(1)  # twice: harmless
    assert [e.seq for e in outbox.entries()] == [3]


def test_only_status_and_telemetry_are_queued(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 100)
    for kind in (TopicKind.HEARTBEAT, TopicKind.DIRECTIVE, TopicKind.BLOCKS_REQUEST):
        with pytest.raises(UsageError):
            outbox.put(kind, b"x")
    assert outbox_is_empty(tmp_path) and outbox_is_empty(tmp_path / "missing")


# -- through the link and a real broker -------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


def make_link(url: str, outbox: Outbox, device_id: str) -> AgentLink:
    return AgentLink(
        device_id,
        MqttSettings(url=url, keepalive_seconds=5),
        outbox,
        on_directive=lambda payload: None,
        on_fleet_timestamp=lambda payload: None,
        backoff=Backoff(initial=0.05, maximum=0.3),
        poll_interval=0.1,
    )


def server_observer(broker: MosquittoBroker, device_id: str) -> Observer:
    """The fleet server's view, with a persistent session so it misses nothing."""
    topics = [f"edgefleet/v1/devices/{device_id}/{kind}" for kind in ("status", "telemetry")]
    return Observer(broker.url, topics, persistent=True)


def received(observer: Observer) -> list[tuple[str, int]]:
    """(kind, sequence or requests) of each message, in arrival order."""
    out = []
    for message in list(observer.messages):
        kind = message.topic.rsplit("/", 1)[1]
        body = json.loads(message.payload)
        out.append((kind, body["sequence"] if kind == "status" else body["requests"]))
    return out


def test_messages_queued_while_the_broker_is_down_arrive_in_order(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    observer = server_observer(broker, device)
    link = make_link(broker.url, Outbox(tmp_path / "outbox", 1 << 20), device)
    try:
        link.start()
        assert link.wait_connected(10)
        broker.stop()
        deadline = time.monotonic() + 10
        while link.is_connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.is_connected
        link.publish(TopicKind.STATUS, status(device, 1))
        link.publish(TopicKind.TELEMETRY, telemetry(device, 10))
        link.publish(TopicKind.STATUS, status(device, 2))
        link.publish(TopicKind.TELEMETRY, telemetry(device, 11))
        assert len(list((tmp_path / "outbox").glob("*.msg"))) == 4  # on disk meanwhile
        broker.start()
        assert link.wait_outbox_empty(15), link.counters()
        expected = [("status", 1), ("telemetry", 10), ("status", 2), ("telemetry", 11)]
        assert observer.wait_for(lambda: len(observer.messages) >= 4)
        assert received(observer) == expected
        assert link.counters().delivered == 4
    finally:
        link.stop()
        observer.close()


def test_full_outbox_drops_oldest_telemetry_and_reports_the_count(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    window_size = len(encode_message(telemetry(device, 0)))
    outbox = Outbox(tmp_path / "outbox", 3 * window_size + 500)  # room for 3 windows
    observer = server_observer(broker, device)
    link = make_link(broker.url, outbox, device)
    try:
        broker.stop()
        link.start()
        link.publish(TopicKind.STATUS, status(device, 1))
        for requests in range(1, 7):  # 6 windows: the 3 oldest must go
            link.publish(TopicKind.TELEMETRY, telemetry(device, requests))
        link.publish(TopicKind.STATUS, status(device, 2))
        queued = [e.kind for e in outbox.entries()]
        assert queued.count(TopicKind.STATUS) == 2 and queued.count(TopicKind.TELEMETRY) == 3
        broker.start()
        assert link.wait_outbox_empty(15)
        link.publish(TopicKind.TELEMETRY, telemetry(device, 100))  # the next window
        assert link.wait_outbox_empty(15)
        assert observer.wait_for(lambda: ("telemetry", 100) in received(observer))
    finally:
        link.stop()
        observer.close()
    assert [m for m in received(observer) if m[0] == "status"] == [("status", 1), ("status", 2)]
    payloads = observer.on(f"edgefleet/v1/devices/{device}/telemetry")
    windows = [parse_message(TelemetryWindow, payload) for payload in payloads]
    assert [w.requests for w in windows] == [4, 5, 6, 100]  # the newest kept, in order
    assert sum(w.dropped_windows for w in windows) == 3  # every drop reported, once
    assert outbox.dropped_count == 0


def test_dropping_a_window_keeps_the_drop_count_it_carried(tmp_path: Path) -> None:
    device = "cam-01"
    size = len(encode_message(telemetry(device, 0).model_copy(update={"dropped_windows": 5})))
    outbox = Outbox(tmp_path, 2 * size)
    carrying = telemetry(device, 1).model_copy(update={"dropped_windows": 5})
    outbox.put(TopicKind.TELEMETRY, encode_message(carrying))
    outbox.put(TopicKind.TELEMETRY, encode_message(telemetry(device, 2)))
    outbox.put(TopicKind.TELEMETRY, encode_message(telemetry(device, 3)))
    assert outbox.take_dropped_count() == 6


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from edgefleet.agentconfig import MqttSettings
    from edgefleet.agent.link import AgentLink
    from edgefleet.agent.outbox import Outbox
    from edgefleet.mqtt import StatusReport
    from edgefleet.mqtt.topics import TopicKind

    directory, url, device = sys.argv[1:4]
    link = AgentLink(device, MqttSettings(url=url), Outbox(Path(directory), 1 << 20),
                     on_directive=print, on_fleet_timestamp=print)
    link.start()
    for sequence in (1, 2, 3):
        link.publish(TopicKind.STATUS, StatusReport(
            device_id=device, sent_at="2030-01-02T03:04:05Z", sequence=sequence,
            install_state="staging"))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_queue_survives_an_agent_killed_while_offline(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    directory = tmp_path / "outbox"
    broker.stop()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), broker.url, device],
        timeout=30,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert child.returncode == -9, child.stderr.decode()
    assert len(list(directory.glob("*.status.msg"))) == 3
    broker.start()
    observer = server_observer(broker, device)
    link = make_link(broker.url, Outbox(directory, 1 << 20), device)
    try:
        link.start()
        assert link.wait_outbox_empty(15)
        assert observer.wait_for(lambda: len(observer.messages) >= 3)
    finally:
        link.stop()
        observer.close()
    assert received(observer) == [("status", 1), ("status", 2), ("status", 3)]
