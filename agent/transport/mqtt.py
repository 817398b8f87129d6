"""One paho-mqtt 2.x client kept connected: persistent session, Last Will, jittered backoff.

`PersistentSession` owns the socket and runs every network step in one thread
of its own (`client.loop()` in a loop, reconnecting with `Backoff` between
attempts). paho's own reconnect delay is not used because it has no jitter.

- The session is persistent under a fixed client id: MQTT 5 with clean start
  off and a Session Expiry Interval, or MQTT 3.1.1 with clean session off, so
  QoS 1 messages published while the client is away are kept for it.
- The Last Will is set before every connect; a clean `stop` first publishes
  `farewell` (and waits for its PUBACK, bounded) then sends DISCONNECT, which
  does not fire the Will; `abort` drops the socket without DISCONNECT, which does.
- `publish` is safe from any thread: a no-op socket-write hook is registered,
  so paho never writes to the socket from the calling thread (paho 2.x has no
  lock around socket writes); it queues the packet and wakes the network thread.
- Hooks run in the network thread: `on_connected` inside paho's CONNACK
  callback (subscribe and publish there), `on_message` for each message (the
  PUBACK of a QoS 1 message goes out after it returns), `on_tick` after each
  loop step once the CONNACK has been processed.
"""

from __future__ import annotations

import contextlib
import enum
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.config import MqttSettings
from edgefleet.agent.errors import ConfigError

MqttProtocol = Literal["5", "3.1.1"]
SESSION_EXPIRY_SECONDS = 30 * 24 * 3600
FAREWELL_TIMEOUT = 2.0


class SessionState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # between attempts, backing off
    CLOSED = "closed"


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: attempt n waits uniform(cap/2, cap), cap = min(maximum, initial*factor**n).

    Half-jitter keeps a fleet that lost its broker at the same moment from
    coming back in step, while never retrying sooner than half the cap. A
    connection that lasted `stable_after` seconds starts the sequence again.
    """

    initial: float = 1.0
    maximum: float = 120.0
    factor: float = 2.0
    stable_after: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.maximum, self.initial * self.factor ** min(attempt, 32))
        return rng.uniform(cap / 2, cap)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """Split `mqtt://[user[:password]@]host[:port]` or `mqtts://...` (ports 1883 / 8883).

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker URL {url!r} is not mqtt://host[:port] or mqtts://host[:port]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} has a bad port") from exc
    return BrokerAddress(
        parts.hostname, port, parts.scheme == "mqtts", parts.username, parts.password
    )


@dataclass(frozen=True)
class SessionHooks:
    on_connected: Callable[[mqtt.Client], None]
    on_message: Callable[[str, bytes], None]
    on_tick: Callable[[], None]
    on_problem: Callable[[str], None]


class PersistentSession:
    """A paho client under a fixed client id, connected and reconnected in its own thread."""

    def __init__(
        self,
        client_id: str,
        settings: MqttSettings,
        hooks: SessionHooks,
        *,
        last_will: tuple[str, bytes],
        farewell: tuple[str, bytes] | None = None,
        protocol: MqttProtocol = "5",
        session_expiry_seconds: int = SESSION_EXPIRY_SECONDS,
        backoff: Backoff = Backoff(),
        max_inflight: int = 24,
        connect_timeout: float = 10.0,
        poll_interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """
        Raises:
            ConfigError: no or a bad broker URL, or TLS files that cannot be loaded.
        """
        if settings.url is None:
            raise ConfigError("no broker URL configured")
        self.address = parse_broker_url(settings.url)
        self.connects = 0
        self.connection_losses = 0
        self.rejected = 0  # PUBACK or SUBACK with a failure reason code
        self._hooks = hooks
        self._farewell = farewell
        self._protocol = protocol
        self._session_expiry = session_expiry_seconds
        self._backoff = backoff
        self._connect_timeout = connect_timeout
        self._poll_interval = poll_interval
        self._keepalive = settings.keepalive_seconds
        self._rng = rng or random.Random()
        self._ready = threading.Event()  # CONNACK processed, not lost since
        self._stopping = threading.Event()
        self._abort = False
        self._state = SessionState.NEW
        self._thread: threading.Thread | None = None
        self.client = self._make_client(client_id, settings, last_will, max_inflight)

    def _make_client(
        self, client_id: str, settings: MqttSettings, will: tuple[str, bytes], max_inflight: int
    ) -> mqtt.Client:
        v5 = self._protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(max_inflight)
        client.will_set(will[0], will[1], qos=1, retain=True)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            try:
                client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load the MQTT TLS files: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_register_write = _ignore_socket  # see the module docstring
        return client

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def start(self) -> None:
        """Raises: RuntimeError when called twice."""
        if self._thread is not None:
            raise RuntimeError("the MQTT session was already started")
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def abort(self, timeout: float = 5.0) -> None:
        self._abort = True
        self.stop(timeout)

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message (any thread); paho keeps QoS 1 messages across reconnects."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._state = SessionState.CONNECTING
            ready_at: float | None = None
            try:
                self._connect()
            except (OSError, ValueError) as exc:
                where = f"{self.address.host}:{self.address.port}"
                self._hooks.on_problem(f"cannot reach the broker at {where}: {exc}")
            else:
                ready_at = self._serve()
            self._ready.clear()
            if self._stopping.is_set():
                break
            if ready_at is not None and time.monotonic() - ready_at >= self._backoff.stable_after:
                attempt = 0
            self._state = SessionState.WAITING
            self._stopping.wait(self._backoff.delay(attempt, self._rng))
            attempt += 1
        self._shutdown()
        self._state = SessionState.CLOSED

    def _connect(self) -> None:
        host, port = self.address.host, self.address.port
        if self._protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry
            self.client.connect(
                host, port, self._keepalive, clean_start=False, properties=properties
            )
        else:
            self.client.connect(host, port, self._keepalive)

    def _serve(self) -> float | None:
        """Run one connection until it ends or `stop`; return when it became ready, if it did."""
        deadline = time.monotonic() + self._connect_timeout
        ready_at: float | None = None
        while not self._stopping.is_set():
            rc = self.client.loop(timeout=self._poll_interval)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if ready_at is not None:
                    self.connection_losses += 1
                self._hooks.on_problem(f"connection to the broker ended: {mqtt.error_string(rc)}")
                break
            if self.client.is_connected():
                if ready_at is None:
                    # Set here, not in on_connect: paho re-sends its unacknowledged
                    # messages after on_connect returns, and those must go first.
                    ready_at = time.monotonic()
                    self.connects += 1
                    self._ready.set()
                    self._state = SessionState.CONNECTED
                self._hooks.on_tick()
            elif ready_at is not None or time.monotonic() > deadline:
                self._hooks.on_problem("the broker did not accept the connection")
                break
        return ready_at

    def _shutdown(self) -> None:
        client = self.client
        sock = client.socket()
        if self._abort or sock is None:
            if isinstance(sock, socket.socket):  # TLS sockets too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the Will fires
                sock.close()
            return
        if self._farewell is not None and client.is_connected():
            topic, payload = self._farewell
            info = client.publish(topic, payload, qos=1, retain=True)
            self._loop_until(info.is_published)
        client.disconnect()
        self._loop_until(lambda: client.socket() is None)

    def _loop_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + FAREWELL_TIMEOUT
        while not done() and time.monotonic() < deadline:
            if self.client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # paho callbacks, in the network thread

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._hooks.on_problem(f"the broker refused the connection: {reason}")
            return
        self._hooks.on_connected(client)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._ready.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                self.rejected += 1
                self._hooks.on_problem(f"the broker refused a subscription: {reason}")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.rejected += 1
            self._hooks.on_problem(f"the broker refused a message: {reason}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._hooks.on_message(message.topic, bytes(message.payload))


def _ignore_socket(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's socket-write hook; the network thread polls for writes itself."""
