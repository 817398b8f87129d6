"""The locked-down broker, for real: mosquitto run as `mosquitto -c OUT/mosquitto.conf` from
the files `edgefleet ca init` and `edgefleet broker config` wrote, paho clients with
certificates from the fleet CA.

Each test fails without the protection it names. A message that must never arrive is
proved absent by order, never by waiting: the same sender then sends one that is
allowed, and mosquitto delivers one client's messages to a subscriber in order, so
once the allowed one arrived the forbidden one would have arrived before it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet.brokerconf import DEFAULT_SERVER_IDENTITY, server_identity
from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.errors import UsageError
from edgefleet.fleetca import FleetCa, init_ca, load_ca, write_private_pem
from edgefleet.mqtt.messages import Presence
from edgefleet.mqtt.topics import (
    DeviceTopics,
    TopicKind,
    device_filter,
    fleet_accepts_topic,
    fleet_timestamp_topic,
    shared_filter,
    trust_root_topic,
)
from edgefleet.server.mqtt.broker import EmbeddedBroker
from edgefleet.server.mqtt.link import SHARED_KINDS, kind_share_filter
from edgefleet.server.settings import DEFAULT_SHARE_GROUP, ServerSettings
from edgefleet.timefmt import utcnow
from tests.agent.broker import WAIT, free_port, mosquitto_or_skip, unique_device_id
from tests.clirun import Cli
from tests.conftest import KeySet
from tests.server.apiclient import enroll_body
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys


def edgefleet(*args: str | Path) -> None:
    assert run_with_error_handling(cli, [str(arg) for arg in args]) == 0


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


class LockedBroker:
    """mosquitto started with the written configuration; restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        self.ca_dir = directory / "ca"
        self.out = directory / "broker"
        self.port = free_port()
        edgefleet("ca", "init", self.ca_dir)
        edgefleet("broker", "config", "--ca", self.ca_dir, "--port", str(self.port), "-o", self.out)
        self.ca: FleetCa = load_ca(self.ca_dir)
        self.server = Identity(self.out / "server-edgefleet.crt", self.out / "server-edgefleet.key")
        self.share_group_file = self.out / "share-group"
        self.share_group = self.share_group_file.read_text().strip()
        self.log_path = directory / "mosquitto.log"
        self._executable = mosquitto_or_skip()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def device(self, device_id: str, ca: FleetCa | None = None) -> Identity:
        """A client certificate named `device_id`, issued by the fleet CA (or `ca`)."""
        issued, key = (ca or self.ca).issue_key_pair(device_id)
        directory = self.out.parent / "devices"
        directory.mkdir(exist_ok=True)
        identity = Identity(directory / f"{device_id}.crt", directory / f"{device_id}.key")
        identity.cert.write_bytes(issued.pem)
        write_private_pem(identity.key, key)
        return identity

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self._executable, "-c", str(self.out / "mosquitto.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self._process.poll() is None, self.log_path.read_text(errors="replace")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not listen:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(WAIT)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedBroker]:
    mosquitto_or_skip()
    locked = LockedBroker(tmp_path_factory.mktemp("lockdown"))
    locked.start()
    try:
        yield locked
    finally:
        locked.stop()


class Peer:
    """One paho MQTT 5 client over TLS: connects, records messages, subscription answers."""

    def __init__(
        self, broker: LockedBroker, identity: Identity | None, client_id: str = ""
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or unique_device_id("peer"),
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(broker.out / "ca.crt"),
            certfile=str(identity.cert) if identity else None,
            keyfile=str(identity.key) if identity else None,
        )
        self.broker = broker
        self.connack: Any = None
        self.disconnects = 0
        self.granted: list[list[Any]] = []
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, *_: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, *args: Any) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, *_: Any
    ) -> None:
        with self._cond:
            self.granted.append(list(codes))
            self._cond.notify_all()

    def connect(self) -> bool:
        """True when the broker accepted the connection, False when it refused it.

        Decided by what happened (a CONNACK, or the connection failing), never by a
        timeout: reaching the bound is an error.
        """
        try:
            self.client.connect("127.0.0.1", self.broker.port, 30, clean_start=True)
        except (ssl.SSLError, OSError):
            return False
        deadline = time.monotonic() + WAIT
        while self.connack is None:
            if self.client.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError("neither a CONNACK nor a refusal")
        if self.connack.is_failure:
            return False
        self.client.loop_start()
        return True

    def subscribe(self, *filters: str) -> list[Any]:
        """Subscribe and return the broker's reason codes, one per filter."""
        with self._cond:
            before = len(self.granted)
        self.client.subscribe([(topic_filter, 1) for topic_filter in filters])
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.granted) > before, WAIT)
            return self.granted[before]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (whatever its reason code)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def received(self, topic: str) -> list[bytes]:
        with self._cond:
            return [payload for seen, payload, _ in self.messages if seen == topic]

    def wait_for(self, topic: str, payload: bytes) -> None:
        with self._cond:
            assert self._cond.wait_for(
                lambda: any(m[:2] == (topic, payload) for m in self.messages), WAIT
            ), f"{payload!r} never arrived on {topic}: {self.messages}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def peer(broker: LockedBroker, identity: Identity | None, client_id: str = "") -> Iterator[Peer]:
    connected = Peer(broker, identity, client_id)
    assert connected.connect(), "the broker refused a valid identity"
    try:
        yield connected
    finally:
        connected.close()


def refused(broker: LockedBroker, identity: Identity | None) -> bool:
    attempt = Peer(broker, identity)
    try:
        return not attempt.connect()
    finally:
        attempt.close()


# -- who may connect ------------------------------------------------------------------------


def test_without_a_certificate_nobody_connects(broker: LockedBroker) -> None:
    assert refused(broker, None)
    # ... while a certificate of the fleet CA does.
    assert not refused(broker, broker.device(unique_device_id()))


def test_a_certificate_from_another_ca_cannot_connect(broker: LockedBroker, tmp_path: Path) -> None:
    stranger = init_ca(tmp_path / "other-ca")
    assert refused(broker, broker.device(unique_device_id(), ca=stranger))


def test_a_revoked_certificate_cannot_connect_once_the_broker_rereads_the_list(
    tmp_path: Path,
) -> None:
    mosquitto_or_skip()
    own = LockedBroker(tmp_path)
    own.start()
    try:
        device = unique_device_id()
        identity = own.device(device)
        assert not refused(own, identity)
        serial = format(_serial(identity.cert), "x")
        (own.out / "crl.pem").write_bytes(own.ca.revocation_list([(serial, utcnow())]))
        own.stop()
        own.start()
        assert refused(own, identity)
        assert not refused(own, own.device(unique_device_id()))  # others still connect
    finally:
        own.stop()


def _serial(cert_path: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


# -- what a device may do -------------------------------------------------------------------


def test_the_server_identity_receives_a_status_and_the_device_its_directive(
    broker: LockedBroker,
) -> None:
    device = DeviceTopics(unique_device_id())
    with (
        peer(broker, broker.server) as server,
        peer(broker, broker.device(device.device_id)) as dev,
    ):
        shared = kind_share_filter(broker.share_group, TopicKind.STATUS)
        assert not any(code.is_failure for code in server.subscribe(shared))
        assert not any(code.is_failure for code in dev.subscribe(device.directive))
        dev.publish(device.status, b"installed")
        server.wait_for(device.status, b"installed")
        server.publish(device.directive, b"install this")
        dev.wait_for(device.directive, b"install this")


def test_a_device_cannot_publish_on_another_devices_topics(broker: LockedBroker) -> None:
    a, b = DeviceTopics(unique_device_id("a")), DeviceTopics(unique_device_id("b"))
    with peer(broker, broker.server) as server, peer(broker, broker.device(a.device_id)) as dev:
        server.subscribe("edgefleet/v1/#")
        for kind in TopicKind:
            dev.publish(b.topic(kind), b"forged")
        dev.publish(a.status, b"mine")  # allowed, and after every forgery
        server.wait_for(a.status, b"mine")
        assert not [m for m in server.messages if m[0].startswith(f"{b.subtree[:-1]}")]


def test_a_device_reads_neither_another_devices_directive_nor_its_telemetry(
    broker: LockedBroker,
) -> None:
    a, b = DeviceTopics(unique_device_id("a")), DeviceTopics(unique_device_id("b"))
    with (
        peer(broker, broker.server) as server,
        peer(broker, broker.device(a.device_id)) as dev_a,
        peer(broker, broker.device(b.device_id)) as dev_b,
    ):
        # Subscribing to B's topics, or to everything, is refused or delivers nothing of B's.
        dev_a.subscribe(a.directive, b.directive, b.telemetry, device_filter(TopicKind.TELEMETRY))
        dev_a.subscribe("#")
        dev_b.publish(b.telemetry, b"b's window")
        server.publish(b.directive, b"for b only")
        server.publish(a.directive, b"for a")  # after B's, from the same sender
        dev_a.wait_for(a.directive, b"for a")
        assert dev_a.received(b.directive) == [] and dev_a.received(b.telemetry) == []


def test_a_device_cannot_divert_reports_from_the_servers_secret_share_group(
    broker: LockedBroker,
) -> None:
    # mosquitto 2.0 does not check subscriptions against the ACL file: a device that
    # joined the server's share group would take its turn at the reports, which the
    # read rule then withholds from it, and the server would never see them. The group
    # name is a secret (OUT/share-group): A joins the well-known names and guesses.
    a, b = DeviceTopics(unique_device_id("a")), DeviceTopics(unique_device_id("b"))
    status = device_filter(TopicKind.STATUS)
    guesses = [kind_share_filter(DEFAULT_SHARE_GROUP, kind) for kind in SHARED_KINDS] + [
        shared_filter(group, status) for group in ("edgefleet-server", "edgefleet", "server")
    ]
    reports = [f"committed {n}".encode() for n in range(6)]
    with (
        peer(broker, broker.server) as server,
        peer(broker, broker.device(a.device_id)) as dev_a,
        peer(broker, broker.device(b.device_id)) as dev_b,
    ):
        server.subscribe(kind_share_filter(broker.share_group, TopicKind.STATUS))
        dev_a.subscribe(*guesses, a.directive)
        for report in reports:
            dev_b.publish(b.status, report)
        for report in reports:  # with A in the group, about half would never arrive
            server.wait_for(b.status, report)
        assert server.received(b.status) == reports
        server.publish(a.directive, b"after b's reports")
        dev_a.wait_for(a.directive, b"after b's reports")
        assert dev_a.received(b.status) == []


def test_a_device_cannot_write_the_retained_fleet_topics_nor_anothers_presence(
    broker: LockedBroker,
) -> None:
    a, b = DeviceTopics(unique_device_id("a")), DeviceTopics(unique_device_id("b"))
    retained = {
        fleet_timestamp_topic(): b"signed timestamp",
        fleet_accepts_topic(): b"signed accepted fields",
        trust_root_topic(2): b"signed trust root 2",
        b.presence: Presence.ONLINE.payload,
    }
    with peer(broker, broker.server) as server, peer(broker, broker.device(a.device_id)) as dev:
        server.subscribe(b.status, a.status)
        for topic, payload in retained.items():
            server.publish(topic, payload, retain=True)
        for topic in retained:
            dev.publish(topic, b"overwritten", retain=True)
            dev.publish(topic, b"", retain=True)  # an empty retained message deletes
        dev.publish(a.status, b"after the attempts")
        server.wait_for(a.status, b"after the attempts")
    with peer(broker, broker.server) as reader:
        reader.subscribe(*retained)
        for topic, payload in retained.items():
            reader.wait_for(topic, payload)
        assert sorted(m[1] for m in reader.messages) == sorted(retained.values())


def test_a_device_reads_the_retained_fleet_topics(broker: LockedBroker) -> None:
    a = DeviceTopics(unique_device_id("a"))
    topic = trust_root_topic(7)
    with peer(broker, broker.server) as server:
        server.publish(topic, b"root 7", retain=True)
        server.publish(fleet_timestamp_topic(), b"timestamp", retain=True)
        server.publish(fleet_accepts_topic(), b"accepted fields", retain=True)
    with peer(broker, broker.device(a.device_id)) as dev:
        codes = dev.subscribe(
            fleet_timestamp_topic(), fleet_accepts_topic(), "edgefleet/v1/fleet/trust-root/+"
        )
        assert not any(code.is_failure for code in codes)
        dev.wait_for(topic, b"root 7")
        dev.wait_for(fleet_timestamp_topic(), b"timestamp")
        dev.wait_for(fleet_accepts_topic(), b"accepted fields")


def test_a_device_client_id_cannot_be_taken_by_another_identity(broker: LockedBroker) -> None:
    a, b = DeviceTopics(unique_device_id("a")), DeviceTopics(unique_device_id("b"))
    identity_a = broker.device(a.device_id)
    with peer(broker, broker.server) as server, peer(broker, identity_a, a.device_id) as dev_a:
        dev_a.subscribe(a.directive)
        # B asks for A's client id (the agent's is its device id); the broker makes it
        # B's own certificate name.
        with peer(broker, broker.device(b.device_id), client_id=a.device_id):
            server.publish(a.directive, b"still for a")
            dev_a.wait_for(a.directive, b"still for a")
            assert dev_a.disconnects == 0  # a takeover would have dropped A first


# -- the fleet server ---------------------------------------------------------------------


def test_the_fleet_server_through_its_identity_sees_a_devices_presence(
    broker: LockedBroker, tmp_path: Path, keyset: KeySet, trust: Any
) -> None:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    data = tmp_path / "data"
    server = ServerProcess.start(
        tmp_path / "server.log", trust_path, key_path, "--data", data, "--open-enrollment",
        "--mqtt", broker.url, "--mqtt-ca", broker.out / "ca.crt",
        "--mqtt-cert", broker.server.cert, "--mqtt-key", broker.server.key,
        "--share-group-file", broker.share_group_file,
    )  # fmt: skip
    try:
        server.wait_healthy()
        device = DeviceTopics(unique_device_id("cam"))
        with server.api() as api:
            json_of(api.post("/devices/enroll", json=enroll_body(device.device_id)), 201)
        create_token: list[str | Path] = [
            sys.executable,
            "-m",
            "edgefleet",
            "server",
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "t",
            "--data",
            data,
        ]
        token = subprocess.run(create_token, capture_output=True, text=True, check=True)
        with peer(broker, broker.device(device.device_id)) as dev:
            dev.publish(device.presence, Presence.ONLINE.payload, retain=True)
            with server.api(token.stdout.strip()) as api:

                def online() -> bool:
                    return bool(json_of(api.get(f"/devices/{device.device_id}"), 200)["online"])

                assert wait_until(online, WAIT * 3), server.log
    finally:
        assert "Traceback" not in server.stop()
    assert server_identity("edgefleet") in broker.log_path.read_text(errors="replace")


# -- `server run`'s broker options ----------------------------------------------------------


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def settings_of_run(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """What `server run` hands the runner (its interface, run_server(settings))."""
    received: list[ServerSettings] = []
    runner = types.ModuleType("edgefleet.server.runner")
    runner.run_server = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefleet.server.runner", runner)
    return received


def test_server_run_takes_the_brokers_tls_files(
    tmp_path: Path, run: Cli, settings_of_run: list[ServerSettings]
) -> None:
    files = {name: tmp_path / name for name in ("ca.crt", "server.crt", "server.key")}
    for path in (*files.values(), tmp_path / "trust.json", tmp_path / "key"):
        path.write_text("")
    base: list[str | Path] = [
        "server",
        "run",
        "--trust",
        tmp_path / "trust.json",
        "--server-key",
        tmp_path / "key",
    ]
    tls: list[str | Path] = [
        "--mqtt-ca",
        files["ca.crt"],
        "--mqtt-cert",
        files["server.crt"],
        "--mqtt-key",
        files["server.key"],
    ]
    run(*base, "--mqtt", "mqtts://broker:8883", *tls)
    (settings,) = settings_of_run
    assert settings.broker_url == "mqtts://broker:8883"
    assert (settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file) == (
        files["ca.crt"].resolve(), files["server.crt"].resolve(), files["server.key"].resolve()
    )  # fmt: skip
    _, err = run(*base, "--mqtt", "mqtt://broker:1883", *tls, status=2)
    assert "need --mqtt mqtts://" in err  # plain MQTT would silently ignore them
    _, err = run(*base, "--mqtt", "mqtts://broker:8883", "--mqtt-cert", files["server.crt"],
                 status=2)  # fmt: skip
    assert "--mqtt-cert and --mqtt-key go together" in err
    assert len(settings_of_run) == 1


def test_the_embedded_broker_refuses_to_listen_beyond_loopback(
    tmp_path: Path, run: Cli, settings_of_run: list[ServerSettings]
) -> None:
    for path in (tmp_path / "trust.json", tmp_path / "key"):
        path.write_text("")
    base: list[str | Path] = [
        "server",
        "run",
        "--embedded-broker",
        "--trust",
        tmp_path / "trust.json",
        "--server-key",
        tmp_path / "key",
    ]
    for beyond in ("0.0.0.0", "192.168.1.10", "::", "broker.example"):
        _, err = run(*base, "--mqtt-host", beyond, status=2)
        assert "no TLS and no authentication" in err and "edgefleet broker config" in err
        with pytest.raises(UsageError, match="loopback only"):
            EmbeddedBroker(1883, host=beyond)
    # The HTTP API may listen everywhere; the embedded broker stays on loopback.
    run(*base, "--host", "0.0.0.0")
    (settings,) = settings_of_run
    assert settings.host == "0.0.0.0" and settings.mqtt_host == "127.0.0.1"


def test_server_run_reads_its_share_group_from_a_file(
    tmp_path: Path, run: Cli, settings_of_run: list[ServerSettings]
) -> None:
    for path in (tmp_path / "trust.json", tmp_path / "key"):
        path.write_text("")
    base: list[str | Path] = [
        "server",
        "run",
        "--trust",
        tmp_path / "trust.json",
        "--server-key",
        tmp_path / "key",
        "--share-group-file",
    ]
    secret = tmp_path / "share-group"
    secret.write_text("edgefleet-0123456789abcdef0123456789abcdef\n")
    run(*base, secret)
    run(*base[:-1])
    assert [settings.share_group for settings in settings_of_run] == [
        "edgefleet-0123456789abcdef0123456789abcdef",
        DEFAULT_SHARE_GROUP,
    ]
    _, err = run(*base, tmp_path / "missing", status=2)
    assert "does not exist" in err and "edgefleet broker config" in err
    _, err = run(*base, secret / "below-a-file", status=2)
    assert "cannot be read" in err
    # Not a name: spaces, a second line, too long for the server's '.diagnostics' suffix.
    for bad in ("two words", "a\nb", "x" * 60, "", "caf\xe9"):
        secret.write_text(bad, encoding="latin-1")
        _, err = run(*base, secret, status=2)
        assert "does not hold a share group name" in err and len(err.splitlines()) == 1
    assert len(settings_of_run) == 2


def test_a_server_with_a_broker_identity_but_the_well_known_group_is_warned(
    tmp_path: Path,
    run: Cli,
    settings_of_run: list[ServerSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = init_ca(tmp_path / "ca")
    issued, key = ca.issue_key_pair(server_identity(DEFAULT_SERVER_IDENTITY))
    (tmp_path / "s.crt").write_bytes(issued.pem)
    (tmp_path / "s.key").write_bytes(key)
    for path in (tmp_path / "trust.json", tmp_path / "key"):
        path.write_text("")
    base: list[str | Path] = [
        "server", "run", "--trust", tmp_path / "trust.json", "--server-key", tmp_path / "key",
        "--mqtt", "mqtts://127.0.0.1:8883", "--mqtt-ca", tmp_path / "ca" / "ca.crt",
        "--mqtt-cert", tmp_path / "s.crt", "--mqtt-key", tmp_path / "s.key",
    ]  # fmt: skip
    secret = tmp_path / "share-group"
    secret.write_text("edgefleet-0123456789abcdef0123456789abcdef\n")
    with caplog.at_level(logging.WARNING):
        run(*base, "--share-group-file", secret)
        assert "share group" not in caplog.text
        run(*base)
    assert "--share-group-file" in caplog.text and DEFAULT_SHARE_GROUP in caplog.text
    assert len(settings_of_run) == 2
