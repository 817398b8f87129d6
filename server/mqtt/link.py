"""The server's MQTT link: one paho-mqtt 2.x client per replica, kept connected.

The connection is the core's `edgefleet.mqtt.session.MqttSession` (the URL,
TLS and credentials, reconnects with jittered backoff, the network thread);
this module adds what is the server's. What it guarantees:
- MQTT 5, clean start off with a Session Expiry Interval, under a fixed client
  id, so a short outage (broker restart, network blip) loses nothing queued for
  this replica; a clean `stop` ends the session (expiry 0 on DISCONNECT) so a
  replica that is gone does not keep absorbing its share of the messages;
- `mqtts://` for TLS to the broker (`tls`: the CA to trust, else the system's,
  and a client certificate and key: the replica's broker identity), and
  `user:password@` in the URL for the broker's password authentication; a
  broker that forces the client id to the certificate's name (the locked-down
  mosquitto, `edgefleet broker config`) changes nothing here;
- subscriptions renewed on every connect: `$share/{group}.{kind}/...` for status,
  heartbeat, telemetry, block requests and diagnostics answers (replicas in the same group share
  them, each message goes to one replica), and a plain subscription for
  presence (every replica sees every presence change; retained presence is
  not delivered on shared subscriptions); without a share group (the embedded
  broker: one replica by construction) every subscription is plain;
- received messages go into a queue consumed by a worker thread that calls
  the handlers, so paho's network thread never waits, neither on the database,
  nor on signature checks, nor on room in the queue (`workers=n` runs n workers,
  each device's messages on the same one, in order);
- a QoS 1 message is acknowledged to the broker only once it is safe: after
  its handler returned and, with `when_stored`, once what the handlers took is
  stored (`when_stored(callback)` calls `callback` then; the ingestor's
  `Ingestor.when_stored`). The broker sends at most `receive_maximum`
  unacknowledged messages (MQTT 5 flow control), which bounds the queue; when
  the handlers fall behind, the rest waits in the broker, and the connection
  (keepalive, directives going out) is unaffected. A replica that dies loses
  nothing it was sent: its session (under the same client id) is redelivered
  what it had not acknowledged when it comes back;
- on every (re)connect, whatever `retained()` lists is published again, retained
  (the fleet's trust roots: an embedded broker forgets retained messages when it
  restarts); publishing the same retained message twice changes nothing;
- `status()` says whether the link is connected and since when (the connection's
  start, or the last moment the previous one was seen up), with its connects and
  losses: for the health check and the metrics; `on_connect` is called once per
  connection, after the retained messages (the fleet timestamp is published
  again from there);
- `publish` is safe from any thread, implementing `Publisher`, and raises
  `PublishError` when the broker did not take the message: a QoS 1 message
  while the broker is away is kept and sent after the reconnect, a QoS 0 one
  (block data) is refused, and so is anything once the link is stopped.

A clean `stop` ends the session (see above) after handling what is queued;
what the ingestor then stores is not acknowledged, and is not needed to be.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edgefleet.backoff import Backoff
from edgefleet.errors import PublishError, UsageError
from edgefleet.mqtt.session import BrokerAddress, MqttSession, Receipt, TlsFiles
from edgefleet.mqtt.topics import TopicKind, device_filter, shared_filter
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.mqtt.interfaces import MessageHandler

log = logging.getLogger(__name__)

SHARED_KINDS = (
    TopicKind.STATUS,
    TopicKind.HEARTBEAT,
    TopicKind.TELEMETRY,
    TopicKind.BLOCKS_REQUEST,
    TopicKind.DIAGNOSTICS,
)
RECONNECT_BACKOFF = Backoff(initial=0.5, maximum=30.0)
RECEIVE_MAXIMUM = 10_000  # unacknowledged messages in flight: ~20 s of a 10,000-device fleet
_STOP = ("", b"", None)  # the worker's end marker
_DEVICES_PREFIX = device_filter(TopicKind.STATUS).split("+", 1)[0]  # edgefleet/v1/devices/


def _suffix(kind: TopicKind) -> str:
    return kind.value.rsplit("/", 1)[-1]  # blocks/request -> request


def kind_share_filter(share_group: str, kind: TopicKind) -> str:
    """`$share/{share_group}.{kind}/edgefleet/v1/devices/+/{kind}`: one share group per kind,
    since rumqttd (the embedded broker) delivers to a client only some of several filters
    shared under one group name.

    Raises:
        UsageError: `share_group` with the kind's suffix is not a valid share group name.
    """
    return shared_filter(f"{share_group}.{_suffix(kind)}", device_filter(kind))


@dataclass(frozen=True)
class LinkStatus:
    """The link at one moment: `since` is a wall-clock time (seconds since the epoch)."""

    connected: bool
    since: float
    connects: int
    losses: int


class ServerLink:
    """The replica's connection to the broker. `start`, `wait_connected`, ... `stop`."""

    def __init__(
        self,
        url: str,
        client_id: str,
        share_group: str | None,
        handlers: Mapping[TopicKind, MessageHandler] | MessageHandler,
        *,
        retained: Callable[[], Sequence[tuple[str, bytes, int]]] | None = None,
        on_connect: Callable[[], None] | None = None,
        session_expiry_s: int = 300,
        tls: TlsFiles | None = None,
        when_stored: Callable[[Callable[[], None]], None] | None = None,
        receive_maximum: int = RECEIVE_MAXIMUM,
        workers: int = 1,
        keepalive_s: int = 30,
        backoff: Backoff = RECONNECT_BACKOFF,
        connect_timeout_s: float = 10.0,
        poll_s: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        """
        `share_group` None subscribes to every kind plainly: for the embedded broker,
        whose router (rumqttd 0.20) stops routing for good when a shared subscriber
        with a kept session leaves while devices publish.

        Raises:
            InvalidRequestError: a bad broker URL or share group, or a handler for a
                kind that devices do not publish.
        """
        if isinstance(handlers, Mapping):
            chosen = dict(handlers)
        else:
            chosen = dict.fromkeys((*SHARED_KINDS, TopicKind.PRESENCE), handlers)
        filters: list[tuple[str, int]] = []
        self._handlers: dict[str, MessageHandler] = {}
        try:
            for kind, handler in chosen.items():
                if kind not in SHARED_KINDS and kind is not TopicKind.PRESENCE:
                    raise InvalidRequestError(f"devices do not publish {kind.value!r}")
                if kind is TopicKind.PRESENCE or share_group is None:
                    filters.append((device_filter(kind), 1))
                else:
                    filters.append((kind_share_filter(share_group, kind), 1))
                self._handlers[_suffix(kind)] = handler
            self._session = MqttSession(
                url,
                client_id,
                on_held_message=self._on_message,
                receive_maximum=receive_maximum,
                on_tick=self._on_tick,
                subscriptions=filters,
                end_session_on_stop=True,  # a replica that stops leaves the group
                session_expiry_s=session_expiry_s,
                tls=tls or TlsFiles(),
                keepalive_s=keepalive_s,
                backoff=backoff,
                max_inflight=1000,
                connect_timeout_s=connect_timeout_s,
                poll_s=poll_s,
                rng=rng,
                certificate_advice="issue the replica a certificate of the fleet CA (edgefleet "
                "broker config --server-identity NAME) and pass it with --mqtt-cert, --mqtt-key",
            )
        except UsageError as exc:  # a bad share group or broker URL
            raise InvalidRequestError(str(exc)) from exc
        self.filters = filters
        self._retained = retained
        self._on_connect = on_connect
        self._when_stored = when_stored
        self._seen_connects = 0  # the connection `_on_tick` last saw begin
        self._connected_since = self._last_seen_up = time.time()
        self.client_id = client_id
        self.received = 0
        self.handled = 0
        self.handler_errors = 0
        self.acknowledged = 0
        # One queue per worker; a device's messages always go to the same worker, so
        # they are handled in the order they arrived.
        self._queues = [_Inbox() for _ in range(max(1, workers))]
        self._workers: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> BrokerAddress:
        return self._session.address

    @property
    def connects(self) -> int:
        return self._session.connects

    @property
    def is_connected(self) -> bool:
        return self._session.is_ready

    def start(self) -> None:
        """Connect in the background (and keep reconnecting), start the workers.

        Raises:
            RuntimeError: called twice.
        """
        if self._workers:
            raise RuntimeError("the server link was already started")
        self._workers = [
            threading.Thread(
                target=self._work, args=(q,), name=f"edgefleet-ingest-{i}", daemon=True
            )
            for i, q in enumerate(self._queues)
        ]
        for worker in self._workers:
            worker.start()
        self._session.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed, False at the timeout."""
        return self._session.wait_subscribed(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once every received message was handled (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle():
                return True
            time.sleep(0.005)
        return self._idle()

    def _idle(self) -> bool:
        return all(q.idle() for q in self._queues)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect (ending the broker session), handle what is queued, end the threads."""
        self._session.stop(timeout)
        if not self._workers:
            return
        for q in self._queues:
            q.put(_STOP)
        for worker in self._workers:
            worker.join(timeout)

    # -- Publisher ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        """Hand a message to the broker's session (any thread).

        Raises:
            PublishError: the broker did not take it (see the module docstring).
        """
        self._session.publish(topic, payload, qos, retain)

    # -- network thread ----------------------------------------------------------------------

    def status(self) -> LinkStatus:
        """Connected or not, since when, and the connects and losses so far (any thread)."""
        connected = self._session.is_ready
        return LinkStatus(
            connected=connected,
            since=self._connected_since if connected else self._last_seen_up,
            connects=self._session.connects,
            losses=self._session.connection_losses,
        )

    def _on_tick(self) -> None:
        """Each turn of a ready connection: note it; at its first, publish the `retained`
        messages again and call `on_connect`."""
        now = time.time()
        last_seen_up, self._last_seen_up = self._last_seen_up, now
        connects = self._session.connects
        if connects == self._seen_connects:
            return
        if self._seen_connects:
            log.info(
                "MQTT link to %s connected again, %.0f s after it was last seen up (connection %d)",
                self._session.address.where,
                now - last_seen_up,
                connects,
            )
        self._seen_connects = connects
        self._connected_since = now
        for topic, payload, qos in self._retained() if self._retained is not None else ():
            try:
                self._session.publish(topic, payload, qos, retain=True)
            except PublishError as exc:  # the connection went meanwhile: the next one retries
                log.warning("not republished: %s", exc)
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                log.exception("the link's on_connect hook failed")

    def _on_message(self, topic: str, payload: bytes, receipt: Receipt) -> None:
        self.received += 1
        queues = self._queues
        target = queues[0] if len(queues) == 1 else queues[_shard(topic, len(queues))]
        target.put((topic, payload, receipt))

    # -- worker thread -----------------------------------------------------------------------

    def _work(self, inbox: _Inbox) -> None:
        handlers = self._handlers
        while True:
            batch = inbox.take()
            receipts: list[Receipt] = []
            try:
                for topic, payload, receipt in batch:
                    if receipt is None:
                        return
                    receipts.append(receipt)
                    handler = handlers.get(topic[topic.rfind("/") + 1 :])
                    if handler is None:
                        continue
                    try:
                        handler(topic, payload)
                        self.handled += 1
                    except Exception:
                        self.handler_errors += 1
                        log.exception("handler for %s failed", topic)
            finally:
                self._settle_when_stored(receipts)
                inbox.done()

    def _settle_when_stored(self, receipts: list[Receipt]) -> None:
        def settle() -> None:
            for receipt in receipts:
                self._session.acknowledge(receipt)
            self.acknowledged += len(receipts)

        if not receipts:
            return
        if self._when_stored is None:
            settle()
        else:
            self._when_stored(settle)


_Item = tuple[str, bytes, Receipt | None]  # None: the worker's end marker


class _Inbox:
    """A FIFO that the worker empties in batches; `put` never waits (the broker's flow
    control bounds it: see the module docstring).

    Cheaper than `queue.Queue` per message: one lock round per `put`, and a
    wake-up only when the worker is actually waiting (a busy worker takes the
    next batch without any signalling).
    """

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._worker_waiting = False
        self._in_hand = 0

    def put(self, item: _Item) -> None:
        with self._cond:
            self._items.append(item)
            if self._worker_waiting:
                self._cond.notify_all()

    def take(self) -> list[_Item]:
        """Everything queued (waiting while nothing is)."""
        with self._cond:
            while not self._items:
                self._worker_waiting = True
                self._cond.wait()
            self._worker_waiting = False
            batch = list(self._items)
            self._items.clear()
            self._in_hand = len(batch)
            return batch

    def done(self) -> None:
        with self._cond:
            self._in_hand = 0

    def idle(self) -> bool:
        with self._cond:
            return not self._items and not self._in_hand


def _shard(topic: str, shards: int) -> int:
    """The worker of a device topic: by the device id level (edgefleet/v1/devices/{id}/...)."""
    start = len(_DEVICES_PREFIX)
    end = topic.find("/", start)
    return hash(topic[start:end]) % shards


__all__ = ["RECEIVE_MAXIMUM", "SHARED_KINDS", "LinkStatus", "ServerLink", "kind_share_filter"]
