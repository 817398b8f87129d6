"""The embedded broker (iotcore / rumqttd) does what the fleet relies on, seen by paho clients."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.server.errors import BrokerError
from edgefleet.server.mqtt.broker import EmbeddedBroker
from tests.agent.broker import WAIT, free_port, unique_device_id

pytest.importorskip("iotcore")


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(free_port()) as running:
        yield running


class Client:
    """A paho MQTT 5 client that records what it receives."""

    def __init__(
        self,
        broker: EmbeddedBroker,
        client_id: str | None = None,
        *,
        persistent: bool = False,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or unique_device_id("c"),
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *a: self._connected.set()
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", broker.port, 30, clean_start=not persistent, properties=properties
        )
        self.client.loop_start()
        assert self._connected.wait(WAIT), "no CONNACK from the embedded broker"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic_filter, 1)
        assert done.wait(WAIT)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def wait_for(self, count: int) -> list[tuple[str, bytes, bool]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, WAIT)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """End the connection without DISCONNECT, as a crash would."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()


def test_qos1_is_queued_for_an_offline_persistent_session(broker: EmbeddedBroker) -> None:
    topic = f"edgefleet/v1/devices/{unique_device_id()}/directive"
    device_id = unique_device_id("dev")
    device = Client(broker, device_id, persistent=True)
    device.subscribe(topic)
    device.close()
    sender = Client(broker)
    sender.publish(topic, b"while you were away")
    sender.close()
    back = Client(broker, device_id, persistent=True)
    try:
        assert back.wait_for(1) == [(topic, b"while you were away", False)]
    finally:
        back.close()


def test_shared_subscriptions_spread_messages_over_the_group(broker: EmbeddedBroker) -> None:
    prefix = unique_device_id("share")
    members = [Client(broker) for _ in range(2)]
    outsider = Client(broker)
    try:
        for member in members:
            member.subscribe(f"$share/replicas/{prefix}/+")
        outsider.subscribe(f"{prefix}/+")
        sender = Client(broker)
        for i in range(20):
            sender.publish(f"{prefix}/{i}", b"m")
        sender.close()
        assert len(outsider.wait_for(20)) == 20  # a plain subscriber gets every message
        with members[0]._cond:
            members[0]._cond.wait_for(
                lambda: len(members[0].received) + len(members[1].received) >= 20, WAIT
            )
        counts = [len(member.received) for member in members]
        assert sum(counts) == 20  # each message to exactly one member
        assert min(counts) >= 5  # and both members got a share
    finally:
        for client in (*members, outsider):
            client.close()


def test_last_will_is_published_and_retained(broker: EmbeddedBroker) -> None:
    presence = f"edgefleet/v1/devices/{unique_device_id()}/presence"
    watcher = Client(broker)
    watcher.subscribe(presence)
    device = Client(broker, will=(presence, b"offline"))
    device.publish(presence, b"online", retain=True)
    assert watcher.wait_for(1)[0][1] == b"online"
    device.drop()
    assert watcher.wait_for(2)[1][:2] == (presence, b"offline")
    watcher.close()
    late = Client(broker)
    try:
        late.subscribe(presence)
        assert late.wait_for(1) == [(presence, b"offline", True)]
    finally:
        late.close()


def test_large_messages_pass(broker: EmbeddedBroker) -> None:
    topic = f"edgefleet/v1/devices/{unique_device_id()}/telemetry"
    receiver = Client(broker)
    receiver.subscribe(topic)
    sender = Client(broker)
    try:
        sender.publish(topic, b"x" * 200_000)  # rumqttd's default limit is 20 KiB
        assert len(receiver.wait_for(1)[0][1]) == 200_000
    finally:
        receiver.close()
        sender.close()


def test_a_taken_port_is_a_broker_error(broker: EmbeddedBroker, tmp_path: Path) -> None:
    second = EmbeddedBroker(broker.port, config_dir=tmp_path)
    with pytest.raises(BrokerError, match=str(broker.port)):
        second.start()
    assert not second.is_running


def is_running(broker: EmbeddedBroker) -> bool:
    return broker.is_running


def test_stop_releases_the_port() -> None:
    port = free_port()
    broker = EmbeddedBroker(port)
    broker.start()
    assert broker.is_running
    assert broker.url == f"mqtt://127.0.0.1:{port}"
    broker.stop()
    broker.stop()  # idempotent
    assert not is_running(broker)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
