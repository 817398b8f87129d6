"""The server's link on the embedded broker (rumqttd through iotcore) keeps receiving
after it loses its connection and after it is stopped and started again, while devices
publish all the while: it subscribes without a share group there (server/runner.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edgefleet.backoff import Backoff
from edgefleet.mqtt.topics import DeviceTopics
from edgefleet.server.mqtt.broker import EmbeddedBroker
from edgefleet.server.mqtt.link import ServerLink
from tests.agent.broker import WAIT, connect, free_port, paho_client, unique_device_id
from tests.server.test_link import Recorder


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Publisher:
    """A device publishing its telemetry at QoS 1 as fast as the broker takes it."""

    def __init__(self, url: str) -> None:
        self.topic = DeviceTopics(unique_device_id()).telemetry
        self._client = paho_client(unique_device_id("dev"))
        connect(self._client, url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._client.publish(self.topic, b"window", qos=1)
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.loop_stop()
        self._client.disconnect()


def start_link(url: str, client_id: str, handler: Recorder) -> ServerLink:
    # A second before each reconnect, so that the device publishes while the link is away:
    # with a share group, that is what stopped rumqttd's routing for good.
    link = ServerLink(url, client_id, None, handler, backoff=Backoff(initial=1.0, maximum=1.0))
    link.start()
    assert link.wait_connected(WAIT)
    return link


def test_the_link_keeps_receiving_after_a_lost_connection_and_a_restart(
    embedded: EmbeddedBroker,
) -> None:
    device = Publisher(embedded.url)
    client_id = unique_device_id("srv")
    try:
        handler = Recorder()
        link = start_link(embedded.url, client_id, handler)
        assert handler.wait_for(50)
        sock = link._session.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # away for a moment, its session kept
        assert link.wait_connected(WAIT)
        seen = len(handler.messages)
        assert handler.wait_for(seen + 50), "nothing arrived after the link reconnected"
        assert link.connects == 2
        link.stop()  # a clean stop ends the session
        again = Recorder()
        second = start_link(embedded.url, client_id, again)
        try:
            assert again.wait_for(50), "nothing arrived after the link was started again"
        finally:
            second.stop()
        assert embedded.is_running
    finally:
        device.close()
