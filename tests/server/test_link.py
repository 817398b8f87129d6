"""The server link on a real mosquitto: shared load, presence for all, sessions, flow
control and acknowledgement once stored, what publishing promises, TLS and credentials."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import func, select

from edgefleet.backoff import Backoff
from edgefleet.errors import PublishError
from edgefleet.mqtt.directives import BundleRef, Directive, HttpSource, sign_directive
from edgefleet.mqtt.session import MqttSession, Receipt
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, StatusReportRow, TelemetryBucket
from edgefleet.server.devices import DeviceKeyCache
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.mqtt.interfaces import MessageHandler
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import (
    WAIT,
    MosquittoBroker,
    Observer,
    connect,
    free_port,
    paho_client,
    publish_once,
    unique_device_id,
)
from tests.agent.test_link import wait_until
from tests.agent.test_link_tls import make_pki
from tests.conftest import KeySet
from tests.server.fleet import FleetSimulator, make_devices
from tests.server.test_ingest import Keys, enroll, make_settings


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.messages.append((topic, payload))

    def wait_for(self, count: int, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return True
            time.sleep(0.01)
        return len(self.messages) >= count


def start_link(
    broker: MosquittoBroker,
    handler: Mapping[TopicKind, MessageHandler] | MessageHandler,
    **kwargs: object,
) -> ServerLink:
    client_id = str(kwargs.pop("client_id", unique_device_id("srv")))
    # A group of its own: a link another test left behind (its session not yet expired on
    # this module's shared broker) would otherwise be handed part of this test's messages.
    group = str(kwargs.pop("group", unique_device_id("group")))
    link = ServerLink(broker.url, client_id, group, handler, **kwargs)  # type: ignore[arg-type]
    link.start()
    assert link.wait_connected(WAIT)
    return link


def test_messages_reach_the_handler_and_publish_reaches_devices(broker: MosquittoBroker) -> None:
    handler = Recorder()
    link = start_link(broker, handler)
    device = DeviceTopics(unique_device_id())
    observer = Observer(broker.url, [device.directive])
    try:
        for topic in (device.status, device.heartbeat, device.telemetry, device.blocks_request):
            publish_once(broker.url, topic, b"x", qos=0)
        publish_once(broker.url, device.presence, b"online", retain=True)
        publish_once(broker.url, device.directive, b"not for the server")
        assert handler.wait_for(5)
        assert sorted(t for t, _ in handler.messages) == sorted(
            [
                device.status,
                device.heartbeat,
                device.telemetry,
                device.blocks_request,
                device.presence,
            ]
        )
        link.publish(device.directive, b"directive", qos=1)
        assert observer.wait_for(lambda: b"directive" in observer.on(device.directive))
    finally:
        observer.close()
        link.stop()


def test_a_publish_from_another_thread_wakes_the_network_thread(
    broker: MosquittoBroker,
) -> None:
    # The network thread waits in select up to poll_s (here 5 s) when nothing arrives; a
    # publish from another thread, and stop, must wake it rather than wait for that.
    link = start_link(broker, Recorder(), poll_s=5.0)
    device = DeviceTopics(unique_device_id())
    observer = Observer(broker.url, [device.directive])

    def received(count: int) -> Callable[[], bool]:
        return lambda: len(observer.on(device.directive)) >= count

    try:
        time.sleep(0.3)  # the connect and subscribe traffic is over: select waits
        started = time.monotonic()
        for i in range(5):
            link.publish(device.directive, f"directive {i}".encode(), qos=1)
            assert observer.wait_for(received(i + 1))
        assert time.monotonic() - started < 2.5
    finally:
        observer.close()
        started = time.monotonic()
        link.stop()
    assert time.monotonic() - started < 2.5


def test_replicas_share_device_messages_and_each_sees_presence(broker: MosquittoBroker) -> None:
    group = unique_device_id("group")
    handlers = [Recorder(), Recorder()]
    links = [start_link(broker, handler, group=group) for handler in handlers]
    device = DeviceTopics(unique_device_id())
    try:
        for i in range(40):
            publish_once(broker.url, device.telemetry, str(i).encode(), qos=1)
        publish_once(broker.url, device.presence, b"offline", retain=True)
        presence = (device.presence, b"offline")

        def this_device_arrived() -> bool:
            # Counted by topic: the shared broker may also deliver other devices' retained presence.
            sent = sum(t == device.telemetry for h in handlers for t, _ in h.messages)
            return sent >= 40 and all(presence in h.messages for h in handlers)

        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not this_device_arrived():
            time.sleep(0.01)
        telemetry = [[p for t, p in h.messages if t == device.telemetry] for h in handlers]
        assert sorted(telemetry[0] + telemetry[1], key=int) == [str(i).encode() for i in range(40)]
        assert telemetry[0] and telemetry[1]
        for handler in handlers:
            assert presence in handler.messages
    finally:
        for link in links:
            link.stop()


class HeldStore:
    """The link's `when_stored` hook of a store that is held up: callbacks wait for `release`."""

    def __init__(self) -> None:
        self.waiting: list[Callable[[], None]] = []
        self._released = False
        self._lock = threading.Lock()

    def __call__(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._released:
                self.waiting.append(callback)
                return
        callback()

    def release(self) -> None:
        with self._lock:
            self._released = True
            waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback()


def send_qos1(url: str, topic: str, count: int) -> None:
    sender = paho_client()
    connect(sender, url)
    try:
        infos = [sender.publish(topic, str(i).encode(), qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        sender.disconnect()
        sender.loop_stop()


def test_a_held_up_store_holds_messages_in_the_broker_not_the_connection(
    broker: MosquittoBroker,
) -> None:
    store = HeldStore()
    handler = Recorder()
    link = start_link(
        broker,
        {TopicKind.TELEMETRY: handler},
        when_stored=store,
        receive_maximum=5,
        keepalive_s=2,
    )
    device = DeviceTopics(unique_device_id())
    observer = Observer(broker.url, [device.directive])
    try:
        send_qos1(broker.url, device.telemetry, 50)
        assert handler.wait_for(5)
        # Nothing is acknowledged, so the broker sends no more than the Receive Maximum ...
        time.sleep(5.0)  # ... and past the broker's keepalive timeout (3 s) the link is still up
        assert link.received == 5
        assert link.status().losses == 0 and link.is_connected
        link.publish(device.directive, b"directive", qos=1)
        assert observer.wait_for(lambda: observer.on(device.directive) == [b"directive"])
        store.release()  # stored at last: acknowledged, and the broker sends the rest
        assert handler.wait_for(50)
        assert link.wait_idle(WAIT)
        received = [p for t, p in handler.messages if t == device.telemetry]
        assert received == [str(i).encode() for i in range(50)]
        assert link.status().losses == 0
    finally:
        observer.close()
        link.stop()


def test_acknowledgements_go_out_in_arrival_order(broker: MosquittoBroker) -> None:
    # The second message settled before the first is not acknowledged on its own: a
    # session that dies then is redelivered both.
    client_id = unique_device_id("srv")
    topic = DeviceTopics(unique_device_id()).telemetry
    held: list[tuple[bytes, Receipt]] = []

    def session() -> MqttSession:
        started = MqttSession(
            broker.url,
            client_id,
            on_held_message=lambda t, p, receipt: held.append((p, receipt)),
            subscriptions=[(topic, 1)],
            end_session_on_stop=True,
        )
        started.start()
        assert started.wait_subscribed(WAIT)
        return started

    first = session()
    send_qos1(broker.url, topic, 2)
    assert wait_until(lambda: len(held) == 2, WAIT)
    first.acknowledge(held[1][1])
    first.abort()  # no DISCONNECT: the broker keeps the session
    held.clear()
    second = session()
    assert wait_until(lambda: len(held) == 2, WAIT)
    assert [p for p, _ in held] == [b"0", b"1"]
    for _, receipt in reversed(held):
        second.acknowledge(receipt)
    second.abort()
    held.clear()
    third = session()
    try:
        send_qos1(broker.url, topic, 1)  # a marker: everything before it was acknowledged
        assert wait_until(lambda: len(held) == 1, WAIT)
        assert [p for p, _ in held] == [b"0"]
    finally:
        third.stop()


def test_a_replica_that_dies_before_storing_loses_nothing(
    broker: MosquittoBroker, sqlite_database: Database, tmp_path: Path
) -> None:
    devices = make_devices(5)
    enroll(sqlite_database, devices)
    client_id, group = unique_device_id("srv"), unique_device_id("group")
    settings = make_settings(tmp_path)
    dying = Ingestor(sqlite_database, Keys(devices), settings)  # never flushes: it dies first
    link = start_link(
        broker, dying.handle, client_id=client_id, group=group, when_stored=dying.when_stored
    )
    fleet = FleetSimulator(broker.url, devices)
    start = utcnow().replace(second=0) - dt.timedelta(minutes=10)
    try:
        for device in devices:
            for minute in range(4):
                fleet.telemetry(device.id, start + dt.timedelta(minutes=minute))
        assert wait_until(lambda: dying.counts["telemetry"] == 20, WAIT)
        assert link.wait_idle(WAIT)
    finally:
        fleet.close()
        link._session.abort()  # as a killed process: no DISCONNECT, nothing stored
        link.stop()
    ingestor = Ingestor(sqlite_database, Keys(devices), settings)
    ingestor.start()
    again = start_link(
        broker, ingestor.handle, client_id=client_id, group=group, when_stored=ingestor.when_stored
    )

    def stored() -> int:
        with sqlite_database.session() as session:
            return int(session.scalar(select(func.sum(TelemetryBucket.windows))) or 0)

    try:
        assert wait_until(lambda: stored() == 20, WAIT)
        assert wait_until(lambda: again.acknowledged == again.received, WAIT)
    finally:
        again.stop()
        ingestor.stop()
    assert stored() == 20


def test_the_session_survives_a_lost_connection_and_ends_on_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet.server.mqtt.link")
    # (mosquitto 2.0 does not restore shared subscriptions after its own restart, so
    # what is published between a broker restart and the link's return is not kept.)
    with MosquittoBroker.running(tmp_path / "mosq") as own:
        handler = Recorder()
        client_id = unique_device_id("srv")
        link = start_link(
            own, handler, client_id=client_id, backoff=Backoff(initial=0.5, maximum=30.0)
        )
        device = DeviceTopics(unique_device_id())
        sock = link._session.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the link is away for a moment; its session is kept
        publish_once(own.url, device.status, b"while away", qos=1)
        publish_once(own.url, device.presence, b"online", qos=1)
        assert handler.wait_for(2)
        assert handler.messages == [(device.status, b"while away"), (device.presence, b"online")]
        assert link.connects == 2
        back = [r.getMessage() for r in caplog.records if "connected again" in r.getMessage()]
        assert len(back) == 1 and "(connection 2)" in back[0], back  # said once, in the log
        link.stop()  # a clean stop ends the session: nothing is kept for this id
        publish_once(own.url, device.status, b"after stop", qos=1)
        again = Recorder()
        second = start_link(own, again, client_id=client_id)
        try:
            time.sleep(0.3)
            assert again.messages == []
        finally:
            second.stop()


def test_publish_keeps_qos1_while_the_broker_is_away_and_refuses_what_it_would_drop(
    tmp_path: Path,
) -> None:
    with MosquittoBroker.running(tmp_path / "mosq") as own:
        link = start_link(own, Recorder(), backoff=Backoff(initial=0.2, maximum=0.5))
        device = DeviceTopics(unique_device_id())
        try:
            own.stop()
            assert wait_until(lambda: not link.is_connected)
            # QoS 1: paho keeps it and sends it after the reconnect (retained, so an
            # observer that subscribes at any time later sees whether it arrived).
            link.publish(device.directive, b"kept", qos=1, retain=True)
            with pytest.raises(PublishError, match="not connected"):
                link.publish(device.blocks_data, b"block", qos=0)  # paho would drop it
            own.start()
            assert link.wait_connected(WAIT)
            observer = Observer(own.url, [device.directive])
            try:
                assert observer.wait_for(lambda: observer.on(device.directive) == [b"kept"])
            finally:
                observer.close()
        finally:
            link.stop()
        with pytest.raises(PublishError, match="stopped"):  # nobody would ever send it
            link.publish(device.directive, b"after stop", qos=1)


def test_credentials_in_the_url_reach_the_broker(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "fleet@site", "s3cret:pw"],
        check=True,
        capture_output=True,
    )
    extra = f"allow_anonymous false\npassword_file {passwords}\n"
    with MosquittoBroker.running(tmp_path / "mosq", extra) as own:
        where = f"127.0.0.1:{own.port}"
        wrong = ServerLink(f"mqtt://fleet%40site:nope@{where}", "srv-wrong", "g", Recorder())
        wrong.start()
        try:
            assert not wrong.wait_connected(1.0)
        finally:
            wrong.stop()
        good = ServerLink(f"mqtt://fleet%40site:s3cret%3Apw@{where}", "srv-good", "g", Recorder())
        good.start()
        try:
            assert good.wait_connected(WAIT)
        finally:
            good.stop()


def test_mqtts_urls_connect_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    extra = f"listener {port} 127.0.0.1\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
    with MosquittoBroker.running(tmp_path / "mosq", extra) as own:
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))  # a CA that did not sign it
        untrusted = ServerLink(f"mqtts://127.0.0.1:{port}", "srv-untrusted", "g", Recorder())
        untrusted.start()
        try:
            assert not untrusted.wait_connected(1.0)
        finally:
            untrusted.stop()
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # the system's CAs, as tests set them
        handler = Recorder()
        link = ServerLink(f"mqtts://127.0.0.1:{port}", "srv-tls", "g", handler)
        link.start()
        try:
            assert link.wait_connected(WAIT)
            device = DeviceTopics(unique_device_id())
            publish_once(own.url, device.status, b"over tls")
            assert handler.wait_for(1) and handler.messages == [(device.status, b"over tls")]
        finally:
            link.stop()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        ServerLink("http://x", "id", "group", Recorder())
    with pytest.raises(InvalidRequestError):
        ServerLink("mqtt://127.0.0.1:1", "id", "bad/group", Recorder())
    with pytest.raises(InvalidRequestError):
        ServerLink("mqtt://127.0.0.1:1", "id", "group", {TopicKind.DIRECTIVE: Recorder()})


FLEET_WAIT = 60.0


def test_a_simulated_fleet_is_ingested_end_to_end(
    broker: MosquittoBroker, sqlite_database: Database, tmp_path: Path
) -> None:
    devices = make_devices(20)
    enroll(sqlite_database, devices)
    keys = DeviceKeyCache(sqlite_database)  # the real cache, reading the enrolled keys
    ingestor = Ingestor(sqlite_database, keys, make_settings(tmp_path))
    link = start_link(broker, ingestor.handle)
    fleet = FleetSimulator(broker.url, devices, clients=2)
    start = utcnow().replace(second=0) - dt.timedelta(minutes=10)
    try:
        for device in devices:
            fleet.presence(device.id, True)
            fleet.heartbeat(device.id)
            fleet.status(device.id, "idle")
            for minute in range(5):
                fleet.telemetry(device.id, start + dt.timedelta(minutes=minute), errors=minute)
        expected = len(devices) * 8
        # A bound on the whole fleet's messages, signed and stored, not a race: on a loaded
        # machine 160 of them took up to 8 s, WAIT's bound on one message.
        deadline = time.monotonic() + FLEET_WAIT
        while sum(ingestor.counts.values()) < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(ingestor.counts.values()) >= expected, dict(ingestor.counts)
        assert link.wait_idle(WAIT)
        assert dict(ingestor.refused) == {}
        ingestor.flush()
        with sqlite_database.session() as session:
            online = session.scalar(select(func.count()).where(Device.online.is_(True)))
            reports = session.scalar(select(func.count()).select_from(StatusReportRow))
            windows = session.scalar(select(func.sum(TelemetryBucket.windows)))
            errors = session.scalar(select(func.sum(TelemetryBucket.errors)))
        assert (online, reports, windows, errors) == (20, 20, 100, 20 * 10)
    finally:
        fleet.close()
        link.stop()


def test_the_simulator_verifies_directives_and_its_answers_are_ingested(
    broker: MosquittoBroker,
    sqlite_database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
) -> None:
    devices = make_devices(3)
    enroll(sqlite_database, devices)
    ingestor = Ingestor(sqlite_database, Keys(devices), make_settings(tmp_path))
    link = start_link(broker, ingestor.handle)
    failing = devices[2].id
    fleet = FleetSimulator(broker.url, devices, trust=trust, fail=[failing])
    now = utcnow()
    try:
        for device in devices:
            directive = Directive(
                issued=format_time(now),
                expires=format_time(now + dt.timedelta(hours=1)),
                device_id=device.id,
                sequence=1,
                action="install",
                bundle=BundleRef(name="demo", version="2.0.0", sha256="a" * 64, length=10),
                sources=[HttpSource(url="http://127.0.0.1/blob")],
            )
            link.publish(
                DeviceTopics(device.id).directive,
                sign_directive(directive, [keyset.server]),
                qos=1,
            )
        # a directive signed by a key the trust root does not know is refused
        forged = directive.model_copy(update={"sequence": 2})
        link.publish(
            DeviceTopics(devices[0].id).directive,
            sign_directive(forged, [keyset.release]),
            qos=1,
        )
        assert fleet.wait_for(lambda: len(fleet.directives) == 3 and len(fleet.refused) == 1)
        assert fleet.refused[0][0] == devices[0].id
        deadline = time.monotonic() + WAIT
        while ingestor.counts["status"] < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.wait_idle(WAIT)
        ingestor.flush()
        with sqlite_database.session() as session:
            rows = {
                d.id: (d.install_state, d.model_version) for d in session.scalars(select(Device))
            }
        assert rows == {
            devices[0].id: ("committed", "2.0.0"),
            devices[1].id: ("committed", "2.0.0"),
            failing: ("failed", None),
        }
    finally:
        fleet.close()
        link.stop()
