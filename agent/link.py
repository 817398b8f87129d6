"""The agent's MQTT link: what the device says and hears over its persistent session.

What it guarantees (the connection itself is the core's `edgefleet.mqtt.session`):
- one persistent session under the device id, so QoS 1 directives published
  while the device is away arrive when it returns (MQTT 5 or 3.1.1);
- presence: the Last Will publishes a retained `offline` on the device's
  presence topic when the connection dies; on every connect the link publishes
  a retained `online`, and on `stop` a retained `offline-clean` before DISCONNECT;
- subscriptions to the device's directive topic, the fleet timestamp, the
  device's blocks_data topic, (with `on_fleet_accepts`) the fields the server
  accepts, and (with `on_trust_root`) every retained trust root version
  (`TRUST_ROOT_FILTER`; the callback gets the version its topic names and the
  document), renewed on every connect;
- received payloads go to the callbacks unparsed (verification belongs to
  their owners). A payload over its size limit, or one whose callback raises
  MessageSchemaError or MalformedDocumentError, counts as malformed; any other
  UntrustedInputError (bad signature, replay, expiry) counts as refused; any
  other exception as a handler error (logged with its traceback). Each is
  reported through `on_problem`; nothing a peer sends can stop the link;
- every message leaves narrowed to the fields the server announced it accepts
  (`narrowing`, which the owner of `on_fleet_accepts` feeds once it verified
  the announcement; `edgefleet.mqtt.fieldsets`): an agent newer than its server
  leaves out the optional fields the server would refuse, rather than have the
  whole message refused. Queued messages are narrowed as they are handed over;
- status reports and telemetry go through the `Outbox` (disk first) and are
  removed after their PUBACK, oldest first, at most `max_inflight` at a time;
  heartbeats are published only while connected (one the broker does not take
  is skipped and counted like one sent while disconnected);
- with a device key (an enrolled device), every message the device sends
  (status, heartbeat, telemetry, diagnostics answer, block request) leaves in a frame
  signed for its topic (`edgefleet.mqtt.devicesig`), so the server knows it came
  from this device. The outbox keeps the plain message and it is signed as it is handed
  to the broker, so messages queued before the key existed are signed too.
  Without a key (an offline device, an older setup) payloads go out plain, and
  a server that requires signatures refuses them. Presence is never signed: the
  Last Will is fixed at connect time, and presence only marks online or
  offline until the next signed heartbeat;
- reconnects with jittered exponential backoff (`edgefleet.backoff.Backoff`,
  bounded); TLS from `[mqtt]` ca_file, cert_file, key_file with `mqtts://`, and
  credentials from the URL's `user:password@`;
- `describe()` says whether the link is connected and, when not, the last
  connection problem: a broker's refusal of the device's certificate is named
  (`broker refused our certificate (revoked or expired?): ...`, with what to
  do), not left as a lost connection (`agent status`, the log).

Callbacks run in the session's network thread: keep them short, and persist
what must survive (an accepted directive) before returning, because the PUBACK
of a QoS 1 message goes out when the callback returns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edgefleet.agent.errors import ConfigError
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.transport.blocks import BlocksHandler
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.errors import (
    MalformedDocumentError,
    MessageSchemaError,
    PublishError,
    UntrustedInputError,
    UsageError,
)
from edgefleet.mqtt.blocks import MAX_BLOCK_PAYLOAD_BYTES
from edgefleet.mqtt.devicesig import DeviceKey, sign_device_payload
from edgefleet.mqtt.directives import (
    MAX_DIRECTIVE_BYTES,
    MAX_FLEET_ACCEPTS_BYTES,
    MAX_FLEET_TIMESTAMP_BYTES,
)
from edgefleet.mqtt.fieldsets import Narrowing
from edgefleet.mqtt.messages import (
    MESSAGE_TYPES,
    Message,
    Presence,
    TelemetryWindow,
    encode_message,
)
from edgefleet.mqtt.session import (
    RECONNECT_BACKOFF,
    SESSION_EXPIRY_SECONDS,
    BrokerAddress,
    MqttProtocol,
    MqttSession,
    SessionState,
    TlsFiles,
)
from edgefleet.mqtt.topics import (
    FLEET_TIMESTAMP_QOS,
    TRUST_ROOT_FILTER,
    TRUST_ROOT_PREFIX,
    TRUST_ROOT_QOS,
    DeviceTopics,
    TopicKind,
    fleet_accepts_topic,
    fleet_timestamp_topic,
    parse_trust_root_topic,
)
from edgefleet.trust import MAX_TRUST_ROOT_BYTES

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = [
    "AgentLink",
    "LinkCounters",
    "LinkState",
    "PayloadHandler",
    "TrustRootHandler",
]

log = logging.getLogger(__name__)

PayloadHandler = Callable[[bytes], None]
TrustRootHandler = Callable[[int, bytes], None]  # (the version its topic names, the document)
LinkState = SessionState
# What to do when the broker refuses the device's certificate (a removed device's is revoked).
CERTIFICATE_ADVICE = (
    "enroll the device again (edgefleet agent enroll) for a new certificate, or set "
    "[mqtt] cert_file and key_file to one the broker accepts"
)


@dataclass
class LinkCounters:
    connects: int = 0
    connection_losses: int = 0
    received: int = 0
    malformed: int = 0  # over its size limit, or its callback found it malformed
    refused: int = 0  # its callback refused it otherwise (signature, replay, expiry, ...)
    handler_errors: int = 0  # a callback raised something else (a bug; logged)
    unexpected: int = 0  # a topic not subscribed to, or blocks nobody is waiting for
    delivered: int = 0  # outbox messages acknowledged by the broker
    rejected: int = 0  # PUBACK or SUBACK with a failure reason code
    heartbeats_skipped: int = 0
    last_problem: str | None = None


class AgentLink:
    """The device's link to the broker. `start`, then `publish`; `stop` at the end.

    Implements `transport.BlockChannel` for the MQTT block fetcher.
    """

    def __init__(
        self,
        device_id: str,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        on_directive: PayloadHandler,
        on_fleet_timestamp: PayloadHandler,
        on_blocks: BlocksHandler | None = None,
        on_fleet_accepts: PayloadHandler | None = None,
        on_trust_root: TrustRootHandler | None = None,
        on_problem: Callable[[str], None] | None = None,
        device_key: DeviceKey | None = None,
        protocol: MqttProtocol = "5",
        session_expiry_seconds: int = SESSION_EXPIRY_SECONDS,
        backoff: Backoff = RECONNECT_BACKOFF,
        max_inflight: int = 16,
        connect_timeout: float = 10.0,
        poll_interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """
        Raises:
            UsageError: `settings.url` is None (an offline device has no link).
            ConfigError: a bad broker URL, or TLS files that cannot be loaded.
        """
        if settings.url is None:
            raise UsageError("no broker URL configured: this device runs offline")
        self.topics = DeviceTopics(device_id)
        self.outbox = outbox
        self._handlers: dict[str, tuple[int, PayloadHandler | None]] = {
            self.topics.directive: (MAX_DIRECTIVE_BYTES, on_directive),
            fleet_timestamp_topic(): (MAX_FLEET_TIMESTAMP_BYTES, on_fleet_timestamp),
            self.topics.blocks_data: (MAX_BLOCK_PAYLOAD_BYTES, on_blocks),
            fleet_accepts_topic(): (MAX_FLEET_ACCEPTS_BYTES, on_fleet_accepts),
        }
        self.narrowing = Narrowing()
        self._on_trust_root = on_trust_root
        self._on_problem = on_problem
        self._device_key = device_key
        self._max_inflight = max_inflight
        self._counters = LinkCounters()
        self._connection_problem: str | None = None  # the session's last problem
        self._connects_logged = 0  # the session's connects already logged
        self._counter_lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._inflight: dict[int, mqtt.MQTTMessageInfo] = {}  # outbox seq -> paho's handle
        try:
            self._session = MqttSession(
                settings.url,
                str(self.topics.device_id),
                on_message=self._on_message,
                on_tick=self._pump,
                on_problem=self._connection_trouble,
                subscriptions=[
                    (self.topics.directive, TopicKind.DIRECTIVE.qos),
                    (fleet_timestamp_topic(), FLEET_TIMESTAMP_QOS),
                    (self.topics.blocks_data, TopicKind.BLOCKS_DATA.qos),
                    *([(fleet_accepts_topic(), FLEET_TIMESTAMP_QOS)] if on_fleet_accepts else []),
                    *([(TRUST_ROOT_FILTER, TRUST_ROOT_QOS)] if on_trust_root else []),
                ],
                birth=(self.topics.presence, Presence.ONLINE.payload),
                last_will=(self.topics.presence, Presence.OFFLINE.payload),
                farewell=(self.topics.presence, Presence.OFFLINE_CLEAN.payload),
                tls=TlsFiles(settings.ca_file, settings.cert_file, settings.key_file),
                protocol=protocol,
                session_expiry_s=session_expiry_seconds,
                keepalive_s=settings.keepalive_seconds,
                backoff=backoff,
                max_inflight=max_inflight + 8,  # presence and block requests beside the outbox
                connect_timeout_s=connect_timeout,
                poll_s=poll_interval,
                rng=rng,
                certificate_advice=CERTIFICATE_ADVICE,
            )
        except UsageError as exc:  # a bad URL or TLS files: the configuration's fault
            raise ConfigError(str(exc)) from exc

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return str(self.topics.device_id)

    @property
    def address(self) -> BrokerAddress:
        return self._session.address

    @property
    def state(self) -> LinkState:
        return self._session.state

    @property
    def is_connected(self) -> bool:
        return self._session.is_ready

    @property
    def alive(self) -> bool:
        """Whether the network thread runs (connected or reconnecting): started, not ended."""
        return self._session.alive

    def counters(self) -> LinkCounters:
        """A snapshot of what the link counted, for heartbeats and `agent status`."""
        session = self._session
        with self._counter_lock:
            return replace(
                self._counters,
                connects=session.connects,
                connection_losses=session.connection_losses,
                rejected=session.rejected,
            )

    def start(self) -> None:
        """Connect in the background, and keep reconnecting until `stop`.

        Raises:
            RuntimeError: called twice.
        """
        self._session.start()

    def load_tls_files(self, settings: MqttSettings) -> None:
        """From the next connect on, trust `settings.ca_file` too and present
        `settings.cert_file` (a newly enrolled or renewed certificate); the current
        connection, if any, keeps what it opened with.

        Raises:
            ConfigError: not mqtts://, or the files are not a CA, a certificate and its key.
        """
        try:
            self._session.load_tls_files(
                TlsFiles(settings.ca_file, settings.cert_file, settings.key_file)
            )
        except (UsageError, OSError) as exc:
            raise ConfigError(f"cannot load the MQTT TLS files: {exc}") from exc

    def wait_connected(self, timeout: float) -> bool:
        return self._session.wait_ready(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline`, disconnect cleanly (the session stays on the broker), end."""
        self._session.stop(timeout)
        self.outbox.release_in_flight()

    def abort(self, timeout: float = 5.0) -> None:
        """Drop the connection without DISCONNECT, as a crash or power cut would.

        The broker then publishes the Last Will. For tests, and for shutting
        down on a fatal error where a clean goodbye cannot be trusted.
        """
        self._session.abort(timeout)
        self.outbox.release_in_flight()

    @property
    def device_key(self) -> DeviceKey | None:
        return self._device_key

    def set_device_key(self, key: DeviceKey | None) -> None:
        """Sign what is sent from now on with `key` (None: send plain payloads)."""
        self._device_key = key

    def _outgoing(self, kind: TopicKind, payload: bytes) -> tuple[str, bytes]:
        """The topic of `kind` and `payload` as it goes on the wire: narrowed to the fields
        the server accepts (a block request, no message, goes as it is), and signed for the
        topic when the device has a key."""
        topic = self.topics.topic(kind)
        payload = self.narrowing.narrow(kind, payload)
        key = self._device_key
        return topic, payload if key is None else sign_device_payload(topic, payload, key)

    def wait_outbox_empty(self, timeout: float) -> bool:
        """True once every queued message was acknowledged, False at the timeout."""
        deadline = time.monotonic() + timeout
        while len(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.02)
        return not len(self.outbox)

    # -- publishing --------------------------------------------------------------------------

    def publish(self, kind: TopicKind, message: Message) -> None:
        """Send a status report, telemetry window, diagnostics answer or heartbeat from this
        device.

        Status, telemetry and diagnostics answers are queued on disk first (see
        `Outbox`); a telemetry window gets the outbox's count of dropped windows added to its
        `dropped_windows`. A heartbeat is sent at once at QoS 0, or skipped and
        counted while disconnected (the next one supersedes it).

        Raises:
            UsageError: a kind that devices do not publish, a message of another
                schema than the kind's, or one naming another device.
            OSError: the outbox could not write to disk.
        """
        expected = MESSAGE_TYPES.get(kind)
        if expected is None or not isinstance(message, expected):
            raise UsageError(f"cannot publish a {type(message).__name__} as {kind}")
        if message.device_id != self.device_id:
            raise UsageError(f"message is from device {message.device_id!r}, not this one")
        if kind is TopicKind.HEARTBEAT:
            if not self._session.is_ready:
                self._count("heartbeats_skipped")
                return
            try:
                self._session.publish(*self._outgoing(kind, encode_message(message)), kind.qos)
            except PublishError:
                self._count("heartbeats_skipped")  # the connection dropped meanwhile
            return
        if isinstance(message, TelemetryWindow):
            dropped = self.outbox.take_dropped_count()
            if dropped:
                message = message.model_copy(
                    update={"dropped_windows": message.dropped_windows + dropped}
                )
        self.outbox.put(kind, encode_message(message))
        self._pump()

    def send_block_request(self, payload: bytes) -> bool:
        """Publish a block request (see `BlockChannel`); False when not connected."""
        if not self._session.is_ready:
            return False
        kind = TopicKind.BLOCKS_REQUEST
        try:
            self._session.publish(*self._outgoing(kind, payload), kind.qos)
        except PublishError:
            return False
        return True

    def set_blocks_handler(self, handler: BlocksHandler | None) -> None:
        self._handlers[self.topics.blocks_data] = (MAX_BLOCK_PAYLOAD_BYTES, handler)

    def _pump(self) -> None:
        """Remove acknowledged messages; hand the oldest queued ones to paho, up to the window.

        Runs in the network thread after each loop step, and in `publish`'s thread.
        """
        with self._pump_lock:
            if not self._session.is_ready:
                return
            connects = self._session.connects
            if connects != self._connects_logged:  # once per (re)connect
                self._connects_logged = connects
                again = f" (again: connection {connects})" if connects > 1 else ""
                log.info("connected to the broker at %s%s", self.address.where, again)
            for seq, info in list(self._inflight.items()):
                if info.is_published():
                    del self._inflight[seq]
                    self.outbox.remove(seq)
                    self._count("delivered")
            room = self._max_inflight - len(self._inflight)
            for entry in self.outbox.take_pending(room) if room > 0 else []:
                try:
                    payload = entry.read()
                except OSError:
                    self.outbox.remove(entry.seq)
                    continue
                try:
                    self._inflight[entry.seq] = self._session.publish(
                        *self._outgoing(entry.kind, payload), entry.kind.qos
                    )
                except PublishError as exc:  # stopping: it stays in the outbox for next time
                    self._problem(str(exc))
                    return

    # -- session hooks (network thread) ------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._count("received")
        limit, handler = self._handler_for(topic)
        if handler is None:
            self._count("unexpected")
            return
        if len(payload) > limit:
            self._count("malformed")
            self._problem(f"payload on {topic} is {len(payload)} bytes, above the {limit} limit")
            return
        try:
            handler(payload)
        except (MessageSchemaError, MalformedDocumentError) as exc:
            self._count("malformed")
            self._problem(f"malformed payload on {topic}: {exc}")
        except UntrustedInputError as exc:
            self._count("refused")
            self._problem(f"payload on {topic} refused: {type(exc).__name__}: {exc}")
        except Exception as exc:
            self._count("handler_errors")
            log.exception("handler for %s failed", topic)
            self._problem(f"handler for {topic} failed: {type(exc).__name__}: {exc}")

    def _handler_for(self, topic: str) -> tuple[int, PayloadHandler | None]:
        on_trust_root = self._on_trust_root
        if on_trust_root is not None and topic.startswith(TRUST_ROOT_PREFIX + "/"):
            return MAX_TRUST_ROOT_BYTES, lambda payload: on_trust_root(
                parse_trust_root_topic(topic), payload
            )
        return self._handlers.get(topic, (0, None))

    # -- accounting --------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._counter_lock:
            setattr(self._counters, name, getattr(self._counters, name) + 1)

    def describe(self) -> str:
        """The link in words (`agent status`): connected, or not and the last problem."""
        if self.is_connected:
            left_out = self.narrowing.left_out()
            if left_out:  # the agent is newer than the server
                return f"connected; the server is older, left out: {', '.join(left_out)}"
            return "connected"
        problem = self._connection_problem
        return "not connected" + (f": {problem}" if problem else "")

    def _connection_trouble(self, text: str) -> None:
        self._connection_problem = text
        self._problem(text)

    def _problem(self, text: str) -> None:
        with self._counter_lock:
            self._counters.last_problem = text
        log.warning("%s", text)
        if self._on_problem is not None:
            try:
                self._on_problem(text)
            except Exception:
                log.exception("on_problem callback failed")
