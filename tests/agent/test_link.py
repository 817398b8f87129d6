"""The agent's MQTT link against a real mosquitto: sessions, presence, bad payloads, reconnects."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.agent.link import AgentLink, LinkState
from edgefleet.agent.outbox import Outbox
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.errors import UsageError
from edgefleet.mqtt import (
    MAX_DIRECTIVE_BYTES,
    Directive,
    Heartbeat,
    StatusReport,
    fleet_timestamp_topic,
    sign_directive,
    verify_directive,
)
from edgefleet.mqtt.session import MqttProtocol
from edgefleet.mqtt.topics import TopicKind
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, Observer, publish_once, unique_device_id
from tests.conftest import KeySet

FAST = Backoff(initial=0.05, maximum=0.3)
SENT = "2030-01-02T03:04:05Z"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker this test alone stops and restarts."""
    with MosquittoBroker.running(tmp_path / "own-broker") as running:
        yield running


class Inbox:
    """Collects what the link hands to a callback."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, payload: bytes) -> None:
        with self._cond:
            self.payloads.append(payload)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.payloads) >= count, timeout)


def make_link(
    url: str,
    tmp_path: Path,
    device_id: str,
    *,
    on_directive: Callable[[bytes], None] | None = None,
    on_fleet_timestamp: Callable[[bytes], None] | None = None,
    protocol: MqttProtocol = "5",
    on_problem: Callable[[str], None] | None = None,
) -> AgentLink:
    return AgentLink(
        device_id,
        MqttSettings(url=url, keepalive_seconds=5),
        Outbox(tmp_path / f"outbox-{device_id}", 1 << 20),
        on_directive=on_directive or Inbox(),
        on_fleet_timestamp=on_fleet_timestamp or Inbox(),
        protocol=protocol,
        on_problem=on_problem,
        backoff=FAST,
        poll_interval=0.1,
    )


@contextlib.contextmanager
def running(link: AgentLink) -> Iterator[AgentLink]:
    link.start()
    try:
        assert link.wait_connected(10), link.counters().last_problem
        yield link
    finally:
        link.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def status(device_id: str, sequence: int) -> StatusReport:
    return StatusReport(device_id=device_id, sent_at=SENT, sequence=sequence, install_state="idle")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_directive_published_while_offline_arrives_on_reconnect(
    broker: MosquittoBroker, tmp_path: Path, protocol: MqttProtocol
) -> None:
    device = unique_device_id()
    with running(make_link(broker.url, tmp_path, device, protocol=protocol)) as link:
        topic = link.topics.directive
    publish_once(broker.url, topic, b"directive-1", qos=1)  # the device is away

    inbox = Inbox()
    with running(make_link(broker.url, tmp_path, device, on_directive=inbox, protocol=protocol)):
        assert inbox.wait_for(1), "the persistent session did not deliver the directive"
    assert inbox.payloads == [b"directive-1"]


def test_directive_published_while_offline_survives_a_broker_restart(
    own_broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    with running(make_link(own_broker.url, tmp_path, device)) as link:
        topic = link.topics.directive
    publish_once(own_broker.url, topic, b"directive-2", qos=1)
    own_broker.restart()
    inbox = Inbox()
    with running(make_link(own_broker.url, tmp_path, device, on_directive=inbox)):
        assert inbox.wait_for(1)
    assert inbox.payloads == [b"directive-2"]


def test_presence_online_then_last_will_offline_when_the_connection_dies(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    link = make_link(broker.url, tmp_path, device)
    observer = Observer(broker.url, [link.topics.presence])
    try:
        link.start()
        assert link.wait_connected(10)
        assert observer.wait_for(lambda: observer.on(link.topics.presence) == [b"online"])
        link.abort()  # the socket goes, no DISCONNECT: a crash or a power cut
        assert observer.wait_for(lambda: observer.on(link.topics.presence)[-1:] == [b"offline"])
    finally:
        observer.close()
    assert link.state is LinkState.CLOSED
    late = Observer(broker.url, [link.topics.presence])  # retained for a server that starts later
    try:
        assert late.wait_for(lambda: late.on(link.topics.presence) == [b"offline"])
        assert late.messages[0].retain
    finally:
        late.close()


def test_network_blip_fires_the_will_then_the_link_comes_back_online(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    link = make_link(broker.url, tmp_path, device)
    observer = Observer(broker.url, [link.topics.presence])
    try:
        with running(link):
            assert observer.wait_for(lambda: observer.on(link.topics.presence) == [b"online"])
            sock = link._session.client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)  # the network drops under a running link
            assert observer.wait_for(
                lambda: observer.on(link.topics.presence) == [b"online", b"offline", b"online"]
            )
            assert link.wait_connected(10) and link.counters().connects == 2
    finally:
        observer.close()


def test_clean_stop_publishes_offline_clean_not_the_will(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    link = make_link(broker.url, tmp_path, device)
    observer = Observer(broker.url, [link.topics.presence])
    try:
        with running(link):
            assert observer.wait_for(lambda: observer.on(link.topics.presence) == [b"online"])
        assert observer.wait_for(
            lambda: observer.on(link.topics.presence) == [b"online", b"offline-clean"]
        )
    finally:
        observer.close()


def test_bad_payloads_are_counted_reported_and_the_link_keeps_working(
    broker: MosquittoBroker, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    device = unique_device_id()
    accepted: list[int] = []
    problems: list[str] = []

    def on_directive(payload: bytes) -> None:
        if payload == b"crash":
            raise RuntimeError("a bug in the handler")
        last = accepted[-1] if accepted else 0
        accepted.append(
            verify_directive(payload, trust, device_id=device, last_sequence=last).sequence
        )

    now = utcnow()
    rollback = Directive(
        issued=format_time(now),
        expires=format_time(now + dt.timedelta(hours=1)),
        device_id=device,
        sequence=7,
        action="rollback",
    )
    link = make_link(
        broker.url, tmp_path, device, on_directive=on_directive, on_problem=problems.append
    )
    with running(link):
        topic = link.topics.directive
        for payload in (
            b"\xff\xfe not json",  # malformed
            b'{"signed": {}, "signatures": []}',  # malformed
            b"x" * (MAX_DIRECTIVE_BYTES + 1),  # malformed: over the limit, never handed on
            sign_directive(rollback, [keyset.release]),  # refused: not the server's key
            b"crash",  # a bug in the handler
            sign_directive(rollback, [keyset.server]),  # accepted
            sign_directive(rollback, [keyset.server]),  # refused: replayed
        ):
            publish_once(broker.url, topic, payload)

        # Counted on receipt, judged after the handler returns: wait for all 7 verdicts.
        def judged() -> int:
            c = link.counters()
            return c.malformed + c.refused + c.handler_errors + len(accepted)

        assert wait_until(lambda: link.counters().received == 7 and judged() == 7)
        counters = link.counters()
    assert accepted == [7]
    assert (counters.malformed, counters.refused, counters.handler_errors) == (3, 2, 1)
    assert len(problems) == 6
    assert "above the" in problems[2] and "WrongRoleError" in problems[3]
    assert "RuntimeError" in problems[4] and "ReplayedDirectiveError" in problems[5]


def test_fleet_timestamp_retained_is_delivered_on_connect(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    publish_once(broker.url, fleet_timestamp_topic(), b"timestamp-3", retain=True)
    inbox = Inbox()
    try:
        with running(make_link(broker.url, tmp_path, unique_device_id(), on_fleet_timestamp=inbox)):
            assert inbox.wait_for(1)
    finally:
        publish_once(broker.url, fleet_timestamp_topic(), b"", retain=True)  # clear it
    assert inbox.payloads == [b"timestamp-3"]


def test_reconnects_with_backoff_after_the_broker_returns(
    own_broker: MosquittoBroker, tmp_path: Path
) -> None:
    link = make_link(own_broker.url, tmp_path, unique_device_id())
    with running(link):
        own_broker.stop()
        assert wait_until(lambda: not link.is_connected)
        time.sleep(0.5)  # a few failed attempts
        assert link.state in (LinkState.WAITING, LinkState.CONNECTING)
        own_broker.start()
        assert link.wait_connected(10)
        assert link.counters().connects == 2 and link.counters().connection_losses == 1


def test_link_that_never_reaches_a_broker_stops_promptly(tmp_path: Path) -> None:
    link = make_link("mqtt://127.0.0.1:9", tmp_path, unique_device_id())
    link.start()
    assert not link.wait_connected(0.5)
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 2 and link.state is LinkState.CLOSED
    assert "cannot reach the broker" in (link.counters().last_problem or "")


def test_heartbeat_sent_when_connected_and_skipped_when_not(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    heartbeat = Heartbeat(
        device_id=device,
        sent_at=SENT,
        uptime_s=1,
        cpu_percent=1.0,
        memory_used_bytes=1,
        memory_total_bytes=2,
        disk_free_bytes=1,
        disk_total_bytes=2,
        agent_version="0.1.0",
        install_state="idle",
    )
    link = make_link(broker.url, tmp_path, device)
    link.publish(TopicKind.HEARTBEAT, heartbeat)  # not started: skipped, not queued
    assert link.counters().heartbeats_skipped == 1 and len(link.outbox) == 0
    observer = Observer(broker.url, [link.topics.heartbeat])
    try:
        with running(link):
            link.publish(TopicKind.HEARTBEAT, heartbeat)
            assert observer.wait_for(lambda: len(observer.on(link.topics.heartbeat)) == 1)
    finally:
        observer.close()


def test_publish_refuses_what_a_device_must_not_send(tmp_path: Path) -> None:
    link = make_link("mqtt://127.0.0.1:9", tmp_path, "cam-01")
    with pytest.raises(UsageError):
        link.publish(TopicKind.DIRECTIVE, status("cam-01", 1))
    with pytest.raises(UsageError):
        link.publish(TopicKind.TELEMETRY, status("cam-01", 1))
    with pytest.raises(UsageError):
        link.publish(TopicKind.STATUS, status("cam-02", 1))
    with pytest.raises(UsageError):
        AgentLink(
            "cam-01", MqttSettings(), link.outbox, on_directive=print, on_fleet_timestamp=print
        )
    link.start()
    with pytest.raises(RuntimeError):
        link.start()
    link.stop()
