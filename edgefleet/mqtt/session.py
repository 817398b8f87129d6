"""One paho-mqtt 2.x client kept connected: the session under the agent's and the server's links.

paho is imported inside the functions that use it, so the core imports this
module on a machine without paho (a device that runs offline).

What `MqttSession` does, for both links alike:
- the broker from one URL: `mqtt://` or `mqtts://` (TLS, with optional CA,
  client certificate and key files), credentials from its `user:password@`;
- a persistent session under a fixed client id: MQTT 5 with clean start off
  and a Session Expiry Interval, or MQTT 3.1.1 with clean session off, so QoS 1
  messages published while the client is away are kept for it;
- on every connect: the subscriptions, then the `birth` message (retained,
  QoS 1), so that whatever the birth prompts (the server sending a directive
  again) finds them in place; `wait_ready` is true once the CONNACK was processed,
  `wait_subscribed` once every subscription was granted since;
- the Last Will set before every connect; a clean `stop` publishes `farewell`
  (waiting for its PUBACK, bounded), then sends DISCONNECT, which does not fire
  the Will (with `end_session_on_stop` the DISCONNECT also ends the session on
  the broker); `abort` drops the socket without DISCONNECT, which fires it;
- reconnects with jittered exponential `Backoff` between attempts; a
  connection that lasted `stable_after_s` starts the sequence again;
- one network thread does all socket I/O. `publish` is safe from any thread:
  a socket-write hook keeps paho from writing in the caller's thread (paho 2.x
  has no lock around socket writes) and wakes the network thread instead.

Publishing says when the broker did not take a message. A message is taken
when paho sent or queued it on a live connection, or, at QoS 1 or 2 while
disconnected, kept it: paho resends every unacknowledged QoS 1/2 message after
the reconnect, which this session keeps trying until `stop`. Otherwise
`publish` raises `PublishError`: a QoS 0 message while disconnected (paho
drops it), any message once `stop` was called (nobody will send it), or paho
refused it. Messages not yet acknowledged when `stop` runs are dropped with the
client; the links' owners resend what matters (the agent's outbox, the rollout
driver's timeouts).

Hooks run in the network thread: `on_message` for each message (the PUBACK of
a QoS 1 message goes out after it returns), `on_tick` after each loop step
while the session is ready, `on_problem` with one line for each problem (the
caller logs it; by default it is logged as a warning).

Acknowledging later (MQTT 5 flow control): given `on_held_message` instead of
`on_message`, the session acknowledges nothing by itself. Each message comes
with a `Receipt`; `acknowledge(receipt)` (any thread) settles it, and the
PUBACKs go out in the order the messages arrived (as MQTT requires), each as
soon as it and every message before it is settled. `receive_maximum` (the
CONNECT's Receive Maximum) bounds how many unacknowledged QoS 1 messages the
broker sends at once, so whoever holds them holds at most that many, and the
network thread never has to wait. A receipt of an earlier connection is not
acknowledged: the resumed session redelivers its message.

A broker that refuses the client's TLS certificate (revoked, expired, of a CA
it does not know, or none presented) ends the connection with a TLS alert,
which paho reports only as a lost connection; the session reads the alert
from paho's log (`_PahoErrors`) and names the refusal and what to do
(`describe_tls_refusal`).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import random
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgefleet.backoff import Backoff
from edgefleet.errors import PublishError, UsageError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import MQTTErrorCode
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

MqttProtocol = Literal["5", "3.1.1"]
RetainedMessage = tuple[str, bytes]  # (topic, payload), published retained at QoS 1
SESSION_EXPIRY_SECONDS = 30 * 24 * 3600
RECONNECT_BACKOFF = Backoff(initial=1.0, maximum=120.0)
FAREWELL_TIMEOUT = 2.0


class SessionState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # between attempts, backing off
    CLOSED = "closed"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        """host:port, for messages (never the password)."""
        return f"{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Split `mqtt://[user[:password]@]host[:port]` or `mqtts://...` (ports 1883 / 8883).

    The user and password are percent-decoded (`%40` for `@`, `%3A` for `:`).

    Raises:
        UsageError: another scheme, no host, or a bad port.
    """
    parts = urllib.parse.urlsplit(url)
    shown = redact_broker_url(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UsageError(f"broker URL {shown!r} is not mqtt://host[:port] or mqtts://host[:port]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as exc:
        raise UsageError(f"broker URL {shown!r} has a bad port") from exc
    return BrokerAddress(
        parts.hostname,
        port,
        parts.scheme == "mqtts",
        _unquoted(parts.username),
        _unquoted(parts.password),
    )


def redact_broker_url(url: str) -> str:
    """`url` with its password replaced by `***`, for messages and logs."""
    scheme, at, rest = url.partition("://")
    userinfo, found, host = rest.rpartition("@")
    if not at or not found or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def _unquoted(value: str | None) -> str | None:
    return None if value is None else urllib.parse.unquote(value)


@dataclass(frozen=True)
class TlsFiles:
    """For `mqtts://`: the CA to trust (None: the system's) and a client certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Receipt:
    """One received message, to `MqttSession.acknowledge` once it is safe."""

    connection: int  # the `_InOrderAcks` generation it arrived in
    sequence: int  # arrival order within the connection
    mid: int
    qos: int


class _InOrderAcks:
    """Receipts in arrival order; settled ones are released as a prefix, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._next = 0
        self._waiting: collections.deque[Receipt] = collections.deque()
        self._settled: set[int] = set()

    def new_connection(self) -> None:
        """Forget the last connection's receipts: its session redelivers them."""
        with self._lock:
            self._generation += 1
            self._waiting.clear()
            self._settled.clear()

    def receive(self, mid: int, qos: int) -> Receipt:
        with self._lock:
            self._next += 1
            receipt = Receipt(self._generation, self._next, mid, qos)
            if qos > 0:
                self._waiting.append(receipt)
            return receipt

    def settle(self, receipt: Receipt, send: Callable[[Receipt], None]) -> None:
        """Mark `receipt` settled; `send` every receipt now settled with all before it."""
        with self._lock:  # held while sending, so that two threads cannot reorder acks
            if receipt.connection != self._generation or receipt.qos == 0:
                return
            self._settled.add(receipt.sequence)
            waiting = self._waiting
            while waiting and waiting[0].sequence in self._settled:
                first = waiting.popleft()
                self._settled.discard(first.sequence)
                send(first)


class MqttSession:
    """A paho client under a fixed client id, connected and reconnected in its own thread."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        on_message: Callable[[str, bytes], None] | None = None,
        on_held_message: Callable[[str, bytes, Receipt], None] | None = None,
        receive_maximum: int | None = None,
        on_tick: Callable[[], None] | None = None,
        on_problem: Callable[[str], None] | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        birth: RetainedMessage | None = None,
        last_will: RetainedMessage | None = None,
        farewell: RetainedMessage | None = None,
        end_session_on_stop: bool = False,
        tls: TlsFiles = TlsFiles(),
        protocol: MqttProtocol = "5",
        session_expiry_s: int = SESSION_EXPIRY_SECONDS,
        keepalive_s: int = 30,
        backoff: Backoff = RECONNECT_BACKOFF,
        stable_after_s: float = 30.0,
        max_inflight: int = 24,
        connect_timeout_s: float = 10.0,
        poll_s: float = 1.0,
        rng: random.Random | None = None,
        certificate_advice: str = "give the client a certificate the broker accepts",
    ) -> None:
        """
        `certificate_advice` says what to do when the broker refuses the client's certificate.
        Exactly one of `on_message` and `on_held_message` (see the module docstring).

        Raises:
            UsageError: a bad broker URL, or TLS files that cannot be loaded.
        """
        if (on_message is None) == (on_held_message is None):
            raise TypeError("give MqttSession one of on_message and on_held_message")
        self.address = parse_broker_url(url)
        self._certificate_advice = certificate_advice
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.connects = 0
        self.connection_losses = 0
        self.rejected = 0  # PUBACK or SUBACK with a failure reason code
        self._on_message_hook = on_message
        self._on_held_message = on_held_message
        self._acks = _InOrderAcks()
        self._receive_maximum = receive_maximum
        self._on_tick = on_tick
        self._on_problem = on_problem or _log_problem
        self._birth = birth
        self._farewell = farewell
        self._end_session_on_stop = end_session_on_stop
        self._protocol = protocol
        self._session_expiry = session_expiry_s
        self._keepalive = keepalive_s
        self._backoff = backoff
        self._stable_after = stable_after_s
        self._connect_timeout = connect_timeout_s
        self._poll = poll_s  # the longest wait in select: keepalive is checked in between
        self._rng = rng or random.Random()
        self._ready = threading.Event()  # CONNACK processed, not lost since
        self._subscribed = threading.Event()  # every subscription granted since
        self._stopping = threading.Event()
        self._abort = False
        self._state = SessionState.NEW
        self._thread: threading.Thread | None = None
        self._network_ident: int | None = None
        # Wakes the network thread's select when another thread queued a packet.
        self._tls_context: ssl.SSLContext | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._paho_errors = _PahoErrors()
        try:
            self.client = self._make_client(last_will, tls, max_inflight)
        except BaseException:
            self._close_wake()
            raise

    def _make_client(
        self, will: RetainedMessage | None, tls: TlsFiles, max_inflight: int
    ) -> mqtt.Client:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self._protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=self._on_held_message is not None,
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(max_inflight)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            try:
                self._tls_context = ssl.create_default_context(
                    cafile=str(tls.ca_file) if tls.ca_file else None
                )
                if tls.cert_file is not None:
                    self._tls_context.load_cert_chain(
                        str(tls.cert_file), str(tls.key_file) if tls.key_file else None
                    )
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot load the MQTT TLS files: {exc}") from exc
            client.tls_set_context(self._tls_context)
        client.enable_logger(self._paho_errors.logger)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_register_write = self._wake_network_thread
        return client

    def load_tls_files(self, tls: TlsFiles) -> None:
        """From the next connect on, trust `tls.ca_file` too and present `tls.cert_file`
        (mqtts:// only): a client certificate that arrived or was renewed while running.

        Raises:
            UsageError: not an mqtts:// session.
            OSError: a file is missing or not a CA, or not a certificate and its key.
        """
        if self._tls_context is None:
            raise UsageError("TLS files need an mqtts:// broker URL")
        if tls.ca_file is not None:
            self._tls_context.load_verify_locations(cafile=str(tls.ca_file))
        if tls.cert_file is not None:
            self._tls_context.load_cert_chain(
                str(tls.cert_file), str(tls.key_file) if tls.key_file else None
            )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def alive(self) -> bool:
        """Whether the network thread runs: started and not ended."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """True once connected (the CONNACK processed), False at the timeout."""
        return self._ready.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and every subscription granted, False at the timeout."""
        return self._ready.wait(timeout) and self._subscribed.wait(timeout)

    def start(self) -> None:
        """Connect in the background, and keep reconnecting until `stop`.

        Raises:
            RuntimeError: called twice.
        """
        if self._thread is not None:
            raise RuntimeError("the MQTT session was already started")
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the farewell, disconnect cleanly, end the network thread."""
        self._stopping.set()
        if self._thread is None:
            self._close_wake()
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")  # out of select now, not at its timeout
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_wake()

    def abort(self, timeout: float = 5.0) -> None:
        """Drop the connection without DISCONNECT, as a crash or power cut would: the Will fires."""
        self._abort = True
        self.stop(timeout)

    def _close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Hand a message to the session (any thread); see the module docstring for "taken".

        Raises:
            PublishError: the session was stopped, a QoS 0 message while
                disconnected, or paho refused the message.
        """
        from paho.mqtt.enums import MQTTErrorCode

        if self._stopping.is_set():
            raise PublishError(f"cannot publish to {topic}: the MQTT session is stopped")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return info
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos > 0:
                return info  # kept by paho, sent after the reconnect
            raise PublishError(
                f"cannot publish to {topic}: not connected to the broker at "
                f"{self.address.where} (QoS 0 messages are not kept)"
            )
        raise PublishError(f"the MQTT client refused a message to {topic}: {_error(info.rc)}")

    def acknowledge(self, receipt: Receipt) -> None:
        """Settle a message given to `on_held_message` (any thread); its PUBACK goes out
        once every message before it is settled too. A receipt of an earlier connection,
        or after `stop`, is ignored: the broker redelivers its message."""
        if not self._stopping.is_set():
            self._acks.settle(receipt, self._send_ack)

    def _send_ack(self, receipt: Receipt) -> None:
        self.client.ack(receipt.mid, receipt.qos)  # queued; the hook wakes the network thread

    # -- network thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._network_ident = threading.get_ident()
        retry = 0
        while not self._stopping.is_set():
            self._state = SessionState.CONNECTING
            ready_at: float | None = None
            self._paho_errors.last = None
            try:
                self._connect()
            except (OSError, ValueError) as exc:
                self._on_problem(
                    describe_tls_refusal(str(exc), self._certificate_advice)
                    or f"cannot reach the broker at {self.address.where}: {exc}"
                )
            else:
                ready_at = self._serve()
            self._ready.clear()
            self._subscribed.clear()
            if self._stopping.is_set():
                break
            if ready_at is not None and time.monotonic() - ready_at >= self._stable_after:
                retry = 0
            self._state = SessionState.WAITING
            self._stopping.wait(self._backoff.delay(retry, self._rng))
            retry += 1
        self._shutdown()
        self._state = SessionState.CLOSED

    def _connect(self) -> None:
        host, port = self.address.host, self.address.port
        if self._protocol == "5":
            properties = _properties("CONNECT")
            properties.SessionExpiryInterval = self._session_expiry
            if self._receive_maximum is not None:
                properties.ReceiveMaximum = self._receive_maximum
            self.client.connect(
                host, port, self._keepalive, clean_start=False, properties=properties
            )
        else:
            self.client.connect(host, port, self._keepalive)

    def _serve(self) -> float | None:
        """Run one connection until it ends or `stop`; return when it became ready, if it did."""
        from paho.mqtt.enums import MQTTErrorCode

        deadline = time.monotonic() + self._connect_timeout
        ready_at: float | None = None
        while not self._stopping.is_set():
            rc = self._pump(self._poll)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if ready_at is not None:
                    self.connection_losses += 1
                socket_error = self._paho_errors.last or ""
                self._on_problem(
                    describe_tls_refusal(socket_error, self._certificate_advice)
                    or f"connection to the broker ended: {_error(rc)}"
                )
                break
            if self.client.is_connected():
                if ready_at is None:
                    # Set here, not in on_connect: paho re-sends its unacknowledged
                    # messages after on_connect returns, and those must go first.
                    ready_at = time.monotonic()
                    self.connects += 1
                    self._ready.set()
                    self._state = SessionState.CONNECTED
                if self._on_tick is not None:
                    self._on_tick()
            elif ready_at is not None or time.monotonic() > deadline:
                self._on_problem("the broker did not accept the connection")
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
            self._pump_until(info.is_published)
        properties = None
        if self._end_session_on_stop and self._protocol == "5":
            properties = _properties("DISCONNECT")
            properties.SessionExpiryInterval = 0
        client.disconnect(properties=properties)
        self._pump_until(lambda: client.socket() is None)

    def _pump_until(self, done: Callable[[], bool]) -> None:
        from paho.mqtt.enums import MQTTErrorCode

        deadline = time.monotonic() + FAREWELL_TIMEOUT
        while not done() and time.monotonic() < deadline:
            if self._pump(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _pump(self, timeout: float) -> MQTTErrorCode:
        """One turn of the network loop: wait for the socket, read a packet, write what
        is queued (the acknowledgement of what was just read included), keep alive.

        paho's own `loop` does the same, except that it wakes itself through a socket
        pair for every packet it queues (two system calls per message received, each
        one a round of the GIL); here only another thread's publish wakes the loop.
        """
        from paho.mqtt.enums import MQTTErrorCode

        client = self.client
        sock = client.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        wanted = [sock] if client.want_write() else []
        try:
            readable = select.select([sock, self._wake_r], wanted, [], timeout)[0]
        except (OSError, ValueError, TypeError):  # the socket was closed meanwhile
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if sock in readable:
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc or MQTTErrorCode.MQTT_ERR_CONN_LOST
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        if client.want_write():
            rc = client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc or MQTTErrorCode.MQTT_ERR_CONN_LOST
        return client.loop_misc()

    def _wake_network_thread(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho's socket-write hook. Registering one keeps `publish` from writing to the
        socket in the caller's thread; the network thread writes what is queued, woken
        here when it may sit in select."""
        if threading.get_ident() != self._network_ident:
            with contextlib.suppress(OSError):  # full (already woken), or closed (stopped)
                self._wake_w.send(b"\0")

    # -- paho callbacks, in the network thread -----------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._on_problem(f"the broker refused the connection: {reason}")
            return
        self._acks.new_connection()
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        else:
            self._subscribed.set()
        if self._birth is not None:
            client.publish(self._birth[0], self._birth[1], qos=1, retain=True)

    def _on_disconnect(self, client: mqtt.Client, *args: Any) -> None:
        self._ready.clear()
        self._subscribed.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(reason) for reason in reasons if reason.is_failure]
        if failed:
            self.rejected += len(failed)
            self._on_problem(f"the broker refused subscriptions {self.subscriptions}: {failed}")
            return
        self._subscribed.set()

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
            self._on_problem(f"the broker refused a message: {reason}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = message.payload
        data = payload if isinstance(payload, bytes) else bytes(payload)
        if self._on_held_message is not None:
            receipt = self._acks.receive(message.mid, message.qos)
            self._on_held_message(message.topic, data, receipt)
        elif self._on_message_hook is not None:
            self._on_message_hook(message.topic, data)


def _properties(packet: Literal["CONNECT", "DISCONNECT"]) -> Properties:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    return Properties(getattr(PacketTypes, packet))  # type: ignore[no-untyped-call]


def _error(rc: MQTTErrorCode) -> str:
    import paho.mqtt.client as mqtt

    return mqtt.error_string(rc)


# TLS alerts by which a broker refuses the client's certificate, as OpenSSL names them,
# and what the refusal says: the certificate is ..., and what to do.
_CERTIFICATE_REFUSALS = (
    ("CERTIFICATE_REVOKED", "revoked or expired?", "it is revoked"),
    ("CERTIFICATE_EXPIRED", "revoked or expired?", "it expired"),
    ("UNKNOWN_CA", "unknown CA", "the broker does not trust the CA that issued it"),
    ("CERTIFICATE_REQUIRED", "none presented", "the broker requires one"),
    ("BAD_CERTIFICATE", "rejected", "the broker rejected it"),
    ("CERTIFICATE_UNKNOWN", "rejected", "the broker rejected it"),
)


def describe_tls_refusal(error: str, advice: str) -> str | None:
    """The broker's refusal of our TLS certificate named, followed by `advice` (what to
    do); None when `error` (an SSL error's text) is not such a refusal."""
    for alert, short, what in _CERTIFICATE_REFUSALS:
        if f"ALERT_{alert}]" in error:
            return f"broker refused our certificate ({short}): {what}: {advice}"
    return None


class _PahoErrors(logging.Handler):
    """Keeps the last socket error paho logged (paho returns only "connection lost").

    A private logger at ERROR, so paho's debug lines are never even formatted."""

    PREFIX = "failed to receive on socket: "

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None
        self.logger = logging.Logger("edgefleet.mqtt.paho", logging.ERROR)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.last = message[len(self.PREFIX) :]


def _log_problem(text: str) -> None:
    log.warning("%s", text)


__all__ = [
    "RECONNECT_BACKOFF",
    "SESSION_EXPIRY_SECONDS",
    "BrokerAddress",
    "MqttProtocol",
    "MqttSession",
    "Receipt",
    "RetainedMessage",
    "SessionState",
    "TlsFiles",
    "describe_tls_refusal",
    "parse_broker_url",
    "redact_broker_url",
]
