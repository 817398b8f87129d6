"""The server's MQTT link: one paho-mqtt 2.x client per replica, kept connected.

What it guarantees:
- MQTT 5, clean start off with a Session Expiry Interval, under a fixed client
  id, so a short outage (broker restart, network blip) loses nothing queued for
  this replica; a clean `stop` ends the session (expiry 0 on DISCONNECT) so a
  replica that is gone does not keep absorbing its share of the messages;
- subscriptions renewed on every connect: `$share/{group}.{kind}/...` for status,
  heartbeat, telemetry and block requests (replicas in the same group share
  them, each message goes to one replica), and a plain subscription for
  presence (every replica sees every presence change; retained presence is
  not delivered on shared subscriptions);
- received messages go into a bounded queue consumed by a worker thread that
  calls the handlers, so paho's network thread never waits on the database or
  on signature checks (`workers=n` runs n workers, each device's messages on
  the same one, in order). When the queue is full the network thread waits for
  room (counted in `.queue_full_waits`): the broker then holds the messages
  (TCP backpressure) rather than anyone dropping them;
- `publish` is safe from any thread (the network thread does all socket
  writes, see `_wake_network_thread`), implementing `Publisher`;
- reconnects with jittered exponential backoff.

A QoS 1 message is acknowledged to the broker once it is in the queue, so a
crash loses what was queued and not yet handled; the ingestor's own in-memory
batches have the same window (see `ingest.py`). Devices keep retrying what
matters (status reports stay in their outbox until acknowledged; directives
are re-sent by the rollout driver).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import UsageError
from edgefleet.mqtt.topics import TopicKind, device_filter, shared_filter
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.mqtt.interfaces import MessageHandler

log = logging.getLogger(__name__)

SHARED_KINDS = (
    TopicKind.STATUS,
    TopicKind.HEARTBEAT,
    TopicKind.TELEMETRY,
    TopicKind.BLOCKS_REQUEST,
)
_STOP = ("", b"")  # the worker's end marker
_DEVICES_PREFIX = device_filter(TopicKind.STATUS).split("+", 1)[0]  # edgefleet/v1/devices/


def _suffix(kind: TopicKind) -> str:
    return kind.value.rsplit("/", 1)[-1]  # blocks/request -> request


class ServerLink:
    """The replica's connection to the broker. `start`, `wait_connected`, ... `stop`."""

    def __init__(
        self,
        url: str,
        client_id: str,
        share_group: str,
        handlers: Mapping[TopicKind, MessageHandler] | MessageHandler,
        *,
        session_expiry_s: int = 300,
        queue_size: int = 50_000,
        workers: int = 1,
        keepalive_s: int = 30,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        poll_s: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        """
        Raises:
            InvalidRequestError: a bad broker URL or share group, or a handler for a
                kind that devices do not publish.
        """
        self.host, self.port = _parse_url(url)
        self.url = url
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
                plain = device_filter(kind)
                # One share group per kind: rumqttd (the embedded broker) delivers to a
                # client only some of several filters shared under one group name.
                group = f"{share_group}.{_suffix(kind)}"
                wanted = plain if kind is TopicKind.PRESENCE else shared_filter(group, plain)
                filters.append((wanted, 1))
                self._handlers[_suffix(kind)] = handler
        except UsageError as exc:  # a bad share group
            raise InvalidRequestError(str(exc)) from exc
        self.filters = filters
        self.client_id = client_id
        self.received = 0
        self.handled = 0
        self.handler_errors = 0
        self.queue_full_waits = 0
        self.connects = 0
        self._session_expiry = session_expiry_s
        self._keepalive = keepalive_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._connect_timeout = connect_timeout_s
        self._poll = poll_s  # the longest wait in select: keepalive is checked in between
        self._rng = rng or random.Random()
        # One queue per worker; a device's messages always go to the same worker, so
        # they are handled in the order they arrived.
        self._queues = [_Inbox(queue_size) for _ in range(max(1, workers))]
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._network_ident: int | None = None
        # Wakes the network thread's select when another thread queued a packet.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._client = self._make_client()

    # -- lifecycle ---------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_register_write = self._wake_network_thread
        return client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background (and keep reconnecting), start the worker.

        Raises:
            RuntimeError: called twice.
        """
        if self._threads:
            raise RuntimeError("the server link was already started")
        self._threads = [
            threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True),
            *(
                threading.Thread(
                    target=self._work, args=(q,), name=f"edgefleet-ingest-{i}", daemon=True
                )
                for i, q in enumerate(self._queues)
            ),
        ]
        for thread in self._threads:
            thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed, False at the timeout."""
        return self._connected.wait(timeout) and self._subscribed.wait(timeout)

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
        self._stopping.set()
        if not self._threads:
            self._wake_r.close()
            self._wake_w.close()
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")  # out of select now, not at its timeout
        network, *workers = self._threads
        network.join(timeout)
        for q in self._queues:
            q.put(_STOP)
        for worker in workers:
            worker.join(timeout)
        if not network.is_alive():
            self._wake_r.close()
            self._wake_w.close()

    # -- Publisher ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        """Queue a message for the broker (any thread). QoS 1 messages wait for a reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    # -- network thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._network_ident = threading.get_ident()
        attempt = 0
        while not self._stopping.is_set():
            try:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self._session_expiry
                self._client.connect(
                    self.host, self.port, self._keepalive, clean_start=False, properties=properties
                )
            except (OSError, ValueError) as exc:
                log.warning("cannot reach the broker at %s: %s", self.url, exc)
            else:
                if self._serve():
                    attempt = 0
            self._connected.clear()
            self._subscribed.clear()
            if self._stopping.is_set():
                break
            initial, maximum = self._backoff
            cap = min(maximum, initial * 2 ** min(attempt, 16))
            self._stopping.wait(self._rng.uniform(cap / 2, cap))
            attempt += 1
        self._disconnect()

    def _serve(self) -> bool:
        """One connection until it ends or `stop`; True when it was established."""
        deadline = time.monotonic() + self._connect_timeout
        established = False
        while not self._stopping.is_set():
            rc = self._pump(self._poll)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("connection to the broker ended: %s", mqtt.error_string(rc))
                break
            if self._client.is_connected():
                established = True
            elif established or time.monotonic() > deadline:
                break
        return established

    def _disconnect(self) -> None:
        client = self._client
        if client.is_connected():
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0  # a replica that stops leaves the group
            client.disconnect(properties=properties)
            deadline = time.monotonic() + 2.0
            while client.socket() is not None and time.monotonic() < deadline:
                if self._pump(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break

    def _pump(self, timeout: float) -> MQTTErrorCode:
        """One turn of the network loop: wait for the socket, read a packet, write what
        is queued (the acknowledgement of what was just read included), keep alive.

        paho's own `loop` does the same, except that it wakes itself through a socket
        pair for every packet it queues (two system calls per message received, each
        one a round of the GIL); here only another thread's publish wakes the loop.
        """
        client = self._client
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
        socket in the caller's thread (paho 2.x has no lock around socket writes); the
        network thread writes what is queued, woken here when it may sit in select."""
        if threading.get_ident() != self._network_ident:
            with contextlib.suppress(OSError):  # full (already woken), or closed (stopped)
                self._wake_w.send(b"\0")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("the broker refused the connection: %s", reason)
            return
        self.connects += 1
        self._connected.set()
        client.subscribe(self.filters)

    def _on_disconnect(self, client: mqtt.Client, *args: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("the broker refused subscriptions %s: %s", self.filters, failed)
            return
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        payload = message.payload
        item = (message.topic, payload if isinstance(payload, bytes) else bytes(payload))
        queues = self._queues
        target = queues[0] if len(queues) == 1 else queues[_shard(item[0], len(queues))]
        if target.put(item):  # it had to wait for room: the broker holds the rest meanwhile
            self.queue_full_waits += 1

    # -- worker thread -----------------------------------------------------------------------

    def _work(self, inbox: _Inbox) -> None:
        handlers = self._handlers
        while True:
            batch = inbox.take()
            try:
                for topic, payload in batch:
                    if not topic:
                        return
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
                inbox.done()


class _Inbox:
    """A bounded FIFO that the worker empties in batches.

    Cheaper than `queue.Queue` per message: one lock round per `put`, and a
    wake-up only when the worker is actually waiting (a busy worker takes the
    next batch without any signalling).
    """

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._max = max(1, maxsize)
        self._worker_waiting = False
        self._producer_waiting = False
        self._in_hand = 0

    def put(self, item: tuple[str, bytes]) -> bool:
        """Append (waiting for room when full); True when it had to wait."""
        with self._cond:
            waited = False
            while len(self._items) >= self._max:
                waited = self._producer_waiting = True
                self._cond.wait()
            self._items.append(item)
            if self._worker_waiting:
                self._cond.notify_all()
            return waited

    def take(self) -> list[tuple[str, bytes]]:
        """Everything queued (waiting while nothing is)."""
        with self._cond:
            while not self._items:
                self._worker_waiting = True
                self._cond.wait()
            self._worker_waiting = False
            batch = list(self._items)
            self._items.clear()
            self._in_hand = len(batch)
            if self._producer_waiting:
                self._producer_waiting = False
                self._cond.notify_all()
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


def _parse_url(url: str) -> tuple[str, int]:
    """mqtt://host[:port] -> (host, port).

    Raises:
        InvalidRequestError: another scheme or no host (TLS is not supported here yet).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise InvalidRequestError(f"broker URL {url!r} is not mqtt://host[:port]")
    try:
        return parts.hostname, parts.port or 1883
    except ValueError as exc:
        raise InvalidRequestError(f"broker URL {url!r} has a bad port") from exc


__all__ = ["SHARED_KINDS", "ServerLink"]
