"""`edgefleet broker check`: does an MQTT broker hold everything edgefleet relies on?

Each check is independent, connects its own clients and ends in one `CheckResult`:

    mqtt5                 an MQTT 5 connection (the server's link needs MQTT 5)
    queued-qos1           QoS 1 messages published while a persistent session is offline
                          are all delivered, in order, when it returns (directives)
    shared-subscriptions  one share group per message kind, as the server's replicas
                          subscribe: every message to exactly one member, each member some
    last-will             a connection dropped without DISCONNECT publishes its Will
                          (QoS 1, retained: device presence)
    retained              a retained message reaches a later subscriber; an empty one clears it
    session-expiry        a session outlives a disconnect within its expiry interval, is
                          gone after it, and ends at once at a DISCONNECT with Session
                          Expiry 0 (a server replica that stops)
    payload-sizes         the largest block message (`MAX_BLOCK_SIZE` and its header: the
                          MQTT block transfer) and the largest device message
                          (`MAX_MESSAGE_BYTES`) arrive intact

Every topic is under `edgefleet/v1/broker-check/RUN/` (RUN random per run), which no
server or agent subscribes to, so checking a production broker disturbs no device;
what is retained there is cleared and every persistent session ended before a check
returns. A server identity of the locked-down broker (`edgefleet broker config`) may use
that subtree; the broker names each connection after its certificate, so the checks
that need two clients at once need two identities (`--cert`/`--key` twice), or the
second connection takes the first one's session over.

paho is imported inside the functions that use it, like edgefleet.mqtt.session.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.errors import LocalError, UntrustedInputError, UsageError
from edgefleet.mqtt.blocks import MAX_BLOCK_PAYLOAD_BYTES
from edgefleet.mqtt.directives import MAX_BLOCK_SIZE
from edgefleet.mqtt.messages import MAX_MESSAGE_BYTES
from edgefleet.mqtt.session import BrokerAddress, parse_broker_url, redact_broker_url
from edgefleet.mqtt.topics import NAMESPACE, Direction, TopicKind

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from paho.mqtt.reasoncodes import ReasonCode

CHECK_PREFIX = f"{NAMESPACE}/broker-check"
QUEUED_MESSAGES = 20
SHARED_MESSAGES = 100
SHARE_MEMBERS = 2
SESSION_EXPIRY_S = 2
SESSION_EXPIRY_GRACE_S = 3.0
# The kinds the server's replicas share, one group each (presence is a plain subscription).
SHARED_KINDS = tuple(
    kind
    for kind in TopicKind
    if kind.direction is Direction.FROM_DEVICE and kind is not TopicKind.PRESENCE
)


class BrokerCheckError(UntrustedInputError):
    """The broker failed at least one of the checks: it lacks something edgefleet relies on."""


class BrokerUnreachableError(LocalError):
    """No MQTT connection to the broker: refused, unreachable, TLS failed, or no CONNACK."""


class CheckFailed(Exception):
    """One check did not hold; the message says what did not."""


@dataclass(frozen=True)
class Identity:
    """A client certificate and its key (PEM), for mqtts://."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class CheckTarget:
    """The broker to check and how to reach it."""

    url: str
    ca_file: Path | None = None
    identities: Sequence[Identity] = ()
    timeout_s: float = 10.0

    @property
    def address(self) -> BrokerAddress:
        """Raises: UsageError for a bad URL, or TLS files with a plain mqtt:// URL."""
        address = parse_broker_url(self.url)
        if not address.tls and (self.ca_file is not None or self.identities):
            raise UsageError(
                f"--ca, --cert and --key are for TLS: use mqtts:// rather than "
                f"{redact_broker_url(self.url)}"
            )
        return address


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


@dataclass
class _Run:
    """What the checks of one run share: the broker, a topic subtree, client ids."""

    target: CheckTarget
    address: BrokerAddress
    prefix: str = field(default_factory=lambda: f"{CHECK_PREFIX}/{secrets.token_hex(6)}")
    clients_made: int = 0

    @property
    def access_hint(self) -> str:
        """For a message that did not arrive at a broker that may have ACLs."""
        if not (self.target.identities or self.address.username):
            return ""
        return f" (may this client use {CHECK_PREFIX}/#? the broker's ACL may forbid it)"

    def topic(self, *levels: str) -> str:
        return "/".join([self.prefix, *levels])

    def client(self, member: int, *, will: tuple[str, bytes] | None = None) -> _Client:
        """A new client; `member` (0, 1) picks the identity among those given."""
        self.clients_made += 1
        identities = self.target.identities
        identity = identities[member % len(identities)] if identities else None
        client_id = f"edgefleet-check-{self.prefix.rsplit('/', 1)[-1]}-{self.clients_made}"
        return _Client(self, client_id, identity, will)

    @contextlib.contextmanager
    def clients(self, count: int) -> Iterator[list[_Client]]:
        made = [self.client(member) for member in range(count)]
        try:
            yield made
        finally:
            for client in made:
                client.close()


class _Client:
    """One paho MQTT 5 client that records what it receives; no reconnects of its own."""

    def __init__(
        self,
        run: _Run,
        client_id: str,
        identity: Identity | None,
        will: tuple[str, bytes] | None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._run = run
        self.timeout = run.target.timeout_s
        self.messages: list[Received] = []
        self.session_present = False
        self.connack: dict[str, Any] = {}
        self.disconnect_reason = ""
        self._cond = threading.Condition()
        self._connack_seen = False
        self._connect_failure = ""
        self._granted: list[ReasonCode] | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if run.address.username is not None:
            self.client.username_pw_set(run.address.username, run.address.password)
        if run.address.tls:
            self.client.tls_set_context(_tls_context(run.target.ca_file, identity))
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # -- callbacks (paho's network thread) ---------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            self._connack_seen = True
            if reason.is_failure:
                self._connect_failure = f"the broker refused the connection: {reason}"
            self.session_present = bool(flags.session_present)
            self.connack = props.json() if props is not None else {}
            self._cond.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            self.disconnect_reason = str(reason)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(message.topic, bytes(message.payload), message.retain, message.qos)
        with self._cond:
            self.messages.append(received)
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        with self._cond:
            self._granted = reasons
            self._cond.notify_all()

    # -- what the checks do ------------------------------------------------------------------

    def connect(self, session_expiry_s: int = 0) -> bool:
        """Connect and wait for the CONNACK; True when the broker had a session.

        With a `session_expiry_s`, a persistent session as edgefleet's clients hold one
        (edgefleet.mqtt.session): clean start off, so the broker keeps what it queued.

        Raises:
            BrokerUnreachableError: no TCP or TLS connection, or no CONNACK in time.
            CheckFailed: the broker refused the connection (its reason code).
        """
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry_s:
            properties.SessionExpiryInterval = session_expiry_s
        with self._cond:
            self._connack_seen = False
            self._connect_failure = ""
        address = self._run.address
        self.client.connect_timeout = self.timeout
        try:
            self.client.connect(
                address.host,
                address.port,
                30,
                clean_start=session_expiry_s == 0,
                properties=properties,
            )
        except (OSError, ssl.SSLError) as exc:
            raise BrokerUnreachableError(
                f"cannot connect to the broker at {address.where}: {exc}"
            ) from exc
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack_seen, self.timeout):
                raise BrokerUnreachableError(
                    f"no CONNACK from the broker at {address.where} within {self.timeout:g} s"
                    + (
                        f" (disconnected: {self.disconnect_reason})"
                        if self.disconnect_reason
                        else ""
                    )
                )
            if self._connect_failure:
                raise CheckFailed(self._connect_failure)
            return self.session_present

    def subscribe(self, *filters: str) -> None:
        """Subscribe at QoS 1 and wait until the broker granted every filter."""
        with self._cond:
            self._granted = None
        result, _ = self.client.subscribe([(topic_filter, 1) for topic_filter in filters])
        self._raise_unless_sent(result, "SUBSCRIBE")
        with self._cond:
            if not self._cond.wait_for(lambda: self._granted is not None, self.timeout):
                raise CheckFailed(f"no SUBACK within {self.timeout:g} s{self._lost()}")
            granted: list[ReasonCode] = self._granted or []
            refused = [
                f"{topic_filter} ({reason})"
                for topic_filter, reason in zip(filters, granted, strict=False)
                if reason.is_failure
            ]
        if refused:
            raise CheckFailed(f"the broker refused the subscription to {', '.join(refused)}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._raise_unless_sent(info.rc, f"a {len(payload)}-byte message")
        deadline = time.monotonic() + self.timeout
        while not info.is_published():
            if time.monotonic() > deadline or not self.client.is_connected():
                raise CheckFailed(
                    f"the broker did not acknowledge a {len(payload)}-byte message within "
                    f"{self.timeout:g} s{self._lost()}"
                )
            time.sleep(0.01)

    def wait_for(self, predicate: Callable[[list[Received]], bool]) -> bool:
        """True once `predicate(messages)` holds, False after the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), self.timeout)

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a crash would: the broker publishes the Will."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # TLS sockets too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    def disconnect(self, *, end_session: bool = False) -> None:
        """DISCONNECT (with Session Expiry 0 when `end_session`) and stop the network thread."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        self.client.disconnect(properties=properties)
        self.client.loop_stop()

    def close(self) -> None:
        """Disconnect, ending any session; idempotent."""
        if self.client.is_connected():
            self.disconnect(end_session=True)
        self.client.loop_stop()

    def _lost(self) -> str:
        if self.client.is_connected():
            return ""
        reason = self.disconnect_reason or "no reason given"
        hint = ""
        if len(self._run.target.identities) == 1:
            hint = (
                "; with one certificate, a broker that names each connection after its "
                "certificate closes one when the next connects: pass a second --cert and --key"
            )
        return f"; the broker closed the connection ({reason}){hint}"

    def _raise_unless_sent(self, result: int, what: str) -> None:
        import paho.mqtt.client as mqtt

        if result != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(
                f"cannot send {what}: {mqtt.error_string(result).rstrip('.')}{self._lost()}"
            )


def _tls_context(ca_file: Path | None, identity: Identity | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if identity is not None:
            context.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from exc
    return context


# -- the checks: each returns what held, or raises CheckFailed saying what did not ----------


def check_mqtt5(run: _Run) -> str:
    with run.clients(1) as (client,):
        client.connect()
        limits = {
            "MaximumPacketSize": "maximum packet size",
            "ReceiveMaximum": "receive maximum",
            "MaximumQoS": "maximum QoS",
        }
        stated = [
            f"{words} {client.connack[key]}"
            for key, words in limits.items()
            if key in client.connack
        ]
        for key, words in (
            ("RetainAvailable", "retained messages"),
            ("SharedSubscriptionAvailable", "shared subscriptions"),
            ("WildcardSubscriptionAvailable", "wildcard subscriptions"),
        ):
            if client.connack.get(key) == 0:
                raise CheckFailed(f"the broker's CONNACK says it has no {words}")
        if client.connack.get("MaximumQoS") == 0:
            raise CheckFailed("the broker's CONNACK says it takes QoS 0 only")
        return "an MQTT 5 connection was accepted" + (
            f" (the broker states {', '.join(stated)})" if stated else ""
        )


def check_queued_qos1(run: _Run) -> str:
    topic = run.topic("queued")
    with run.clients(2) as (device, server):
        device.connect(session_expiry_s=300)
        device.subscribe(topic)
        device.disconnect()
        server.connect()
        sent = [f"queued {index}".encode() for index in range(QUEUED_MESSAGES)]
        for payload in sent:
            server.publish(topic, payload)
        if not device.connect(session_expiry_s=300):
            raise CheckFailed("the broker did not keep the offline session (no session present)")
        device.wait_for(lambda messages: len(messages) >= len(sent))
        got = [message.payload for message in device.messages]
        if got != sent:
            missing = len(set(sent) - set(got))
            raise CheckFailed(
                f"{len(got)} of {len(sent)} QoS 1 messages published while the session was "
                f"offline were delivered on its return ({missing} lost"
                f"{', out of order' if sorted(got) != got else ''}): the broker's queue per "
                f"offline client is too short (mosquitto: max_queued_messages){run.access_hint}"
            )
        if any(message.qos != 1 for message in device.messages):
            raise CheckFailed("queued messages were delivered below QoS 1")
    return (
        f"{len(sent)} QoS 1 messages published while a persistent session was offline: "
        "all delivered on its return, in order"
    )


def check_shared_subscriptions(run: _Run) -> str:
    group = f"check{run.prefix.rsplit('/', 1)[-1]}"
    filters = [
        f"$share/{group}.{kind.value.rsplit('/', 1)[-1]}/{run.topic('devices', '+', kind.value)}"
        for kind in SHARED_KINDS
    ]
    with run.clients(SHARE_MEMBERS) as members:
        for member in members:
            member.connect()
            member.subscribe(*filters)
        sent = {}
        for index in range(SHARED_MESSAGES):
            kind = SHARED_KINDS[index % len(SHARED_KINDS)]
            topic = run.topic("devices", f"dev-{index % 4}", kind.value)
            sent[f"{index}".encode()] = topic
            members[0].publish(topic, f"{index}".encode())

        def all_arrived(_: list[Received]) -> bool:
            return sum(len(member.messages) for member in members) >= len(sent)

        members[0].wait_for(all_arrived)
        got = [(message.payload, message.topic) for m in members for message in m.messages]
        payloads = [payload for payload, _ in got]
        duplicated = len(payloads) - len(set(payloads))
        lost = len(set(sent) - set(payloads))
        if duplicated or lost:
            raise CheckFailed(
                f"{len(sent)} messages over {SHARE_MEMBERS} members: {lost} lost, "
                f"{duplicated} delivered twice{run.access_hint if lost else ''}"
            )
        starved = [
            f"member {number + 1} got no {kind.value}"
            for number, member in enumerate(members)
            for kind in SHARED_KINDS
            if not any(m.topic.endswith(f"/{kind.value}") for m in member.messages)
        ]
        if starved:
            raise CheckFailed(
                f"{len(sent)} messages over {SHARE_MEMBERS} members, none lost or twice, but "
                f"{'; '.join(starved)}: the broker does not share each kind's group"
            )
    return (
        f"{len(sent)} messages over {len(SHARED_KINDS)} kinds (one share group each) and "
        f"{SHARE_MEMBERS} members: each member got some of every kind, none twice, none lost"
    )


def check_last_will(run: _Run) -> str:
    topic = run.topic("will")
    will = b"offline"
    with run.clients(1) as (watcher,):
        watcher.connect()
        watcher.subscribe(topic)
        crashing = run.client(1, will=(topic, will))
        try:
            crashing.connect()
            crashing.drop()
            arrived = watcher.wait_for(lambda ms: any(m.payload == will for m in ms))
        finally:
            crashing.close()
        watcher.publish(topic, b"", retain=True)  # clear the retained Will
        if not arrived:
            raise CheckFailed(
                f"a client dropped without DISCONNECT: its Last Will did not arrive within "
                f"{watcher.timeout:g} s{run.access_hint}"
            )
    return "a client dropped without DISCONNECT: its Last Will (QoS 1, retained) arrived"


def check_retained(run: _Run) -> str:
    topic = run.topic("retained")
    with run.clients(2) as (server, device):
        server.connect()
        server.publish(topic, b"retained", retain=True)
        device.connect()
        device.subscribe(topic)
        if not device.wait_for(lambda ms: len(ms) > 0):
            raise CheckFailed(
                "a later subscriber did not receive the retained message" + run.access_hint
            )
        first = device.messages[0]
        if first.payload != b"retained" or not first.retain:
            raise CheckFailed("a later subscriber received the message without its retain flag")
        server.publish(topic, b"", retain=True)
    # Cleared? A new subscriber gets a marker published after its SUBACK; a retained
    # message still there would have arrived before it.
    with run.clients(2) as (server, device):
        server.connect()
        device.connect()
        device.subscribe(topic)
        server.publish(topic, b"marker")
        if not device.wait_for(lambda ms: any(m.payload == b"marker" for m in ms)):
            raise CheckFailed("a message published after a subscription did not arrive")
        if device.messages[0].payload != b"marker":
            raise CheckFailed("an empty retained message did not clear the retained one")
    return (
        "a retained message reached a later subscriber (retain flag set); an empty one cleared it"
    )


def check_session_expiry(run: _Run) -> str:
    expiry = f"a session with a {SESSION_EXPIRY_S} s expiry"
    with run.clients(1) as (client,):
        client.connect(SESSION_EXPIRY_S)
        client.subscribe(run.topic("expiry"))
        client.disconnect()
        if not client.connect(SESSION_EXPIRY_S):
            raise CheckFailed(f"{expiry} was gone at once after a disconnect")
        client.disconnect(end_session=True)  # as a server replica stops
        if client.connect(SESSION_EXPIRY_S):
            raise CheckFailed(
                f"{expiry} was still there after a DISCONNECT with Session Expiry 0 "
                "(a stopped server replica would keep its share of the messages)"
            )
        client.disconnect()
        waited = SESSION_EXPIRY_S + SESSION_EXPIRY_GRACE_S
        time.sleep(waited)
        if client.connect(SESSION_EXPIRY_S):
            raise CheckFailed(
                f"{expiry} was still there {waited:g} s after its disconnect: the broker "
                "keeps sessions past their expiry"
            )
    return (
        f"{expiry} outlived a disconnect, ended at a DISCONNECT with Session Expiry 0, "
        f"and was gone {waited:g} s after a plain disconnect"
    )


def check_payload_sizes(run: _Run) -> str:
    sizes = {
        f"block message ({MAX_BLOCK_SIZE // 1024} KiB block and header)": MAX_BLOCK_PAYLOAD_BYTES,
        "device message (the largest)": MAX_MESSAGE_BYTES,
    }
    with run.clients(1) as (client,):
        client.connect()
        stated = client.connack.get("MaximumPacketSize")
        client.subscribe(run.topic("payload", "#"))
        for number, (what, size) in enumerate(sizes.items()):
            if stated is not None and stated < size:
                raise CheckFailed(
                    f"the broker states a maximum packet size of {stated} bytes, below a "
                    f"{size}-byte {what} (mosquitto: max_packet_size)"
                )
            payload = secrets.token_bytes(size)
            client.publish(run.topic("payload", str(number)), payload)
            digest = hashlib.sha256(payload).digest()
            if not client.wait_for(functools.partial(_holds_payload, digest=digest)):
                raise CheckFailed(
                    f"a {size}-byte {what} was acknowledged but did not arrive intact"
                    + run.access_hint
                )
    return " and ".join(f"a {size}-byte {what}" for what, size in sizes.items()) + " arrived intact"


def _holds_payload(messages: list[Received], digest: bytes) -> bool:
    return any(hashlib.sha256(message.payload).digest() == digest for message in messages)


CHECKS: dict[str, Callable[[_Run], str]] = {
    "mqtt5": check_mqtt5,
    "queued-qos1": check_queued_qos1,
    "shared-subscriptions": check_shared_subscriptions,
    "last-will": check_last_will,
    "retained": check_retained,
    "session-expiry": check_session_expiry,
    "payload-sizes": check_payload_sizes,
}


def run_checks(
    target: CheckTarget, report: Callable[[CheckResult], None] = lambda result: None
) -> list[CheckResult]:
    """Run every check against `target`, handing each result to `report` as it is known.

    Raises:
        UsageError: a bad URL, or TLS files that cannot be loaded.
        BrokerUnreachableError: a check could not connect at all.
    """
    run = _Run(target, target.address)
    results = []
    for name, check in CHECKS.items():
        try:
            result = CheckResult(name, True, check(run))
        except CheckFailed as exc:
            result = CheckResult(name, False, str(exc))
        report(result)
        results.append(result)
    return results


__all__ = [
    "CHECKS",
    "CHECK_PREFIX",
    "BrokerCheckError",
    "BrokerUnreachableError",
    "CheckResult",
    "CheckTarget",
    "Identity",
    "run_checks",
]
