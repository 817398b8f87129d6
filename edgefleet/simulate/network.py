"""Many simulated devices in one process: one MQTT client each, one network loop for all.

Each device has its own MQTT identity (client id = device id), its own
persistent session and Last Will (`offline` on its presence topic), and its
own Ed25519 key. No thread per device: every paho client is driven by the one
loop of `Simulation.run`, over a `selectors` selector, with paho's
`loop_read`, `loop_write` and `loop_misc` (paho's external event loop). Only
that loop touches paho. HTTP work (enrollment, bundle downloads and their
verification) runs on a small pool of threads sharing one httpx client; its
results come back to the loop through a queue.

A directive is verified against the trust root (per-device sequence); an
install downloads the bundle from the directive's HTTP source, checks its
length and SHA-256 against the directive and verifies it
(`edgefleet.bundle.verify_bundle`: every signature and file, nothing
installed), then reports `committed`, or `failed` with the reason. A share
`fail_rate` of installs fails on purpose after its download. At each
heartbeat a device goes offline with probability `offline_rate` for
`offline_seconds` (it says `offline-clean` and disconnects; its session keeps
what the server sends meanwhile).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import heapq
import itertools
import queue
import random
import selectors
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet import __version__
from edgefleet.backoff import Backoff
from edgefleet.bundle import verify_bundle
from edgefleet.errors import EdgefleetError, UntrustedInputError, UsageError
from edgefleet.mqtt.directives import Directive, HttpSource, verify_directive
from edgefleet.mqtt.messages import Message, Presence, StatusReport
from edgefleet.mqtt.session import parse_broker_url
from edgefleet.mqtt.topics import TopicKind
from edgefleet.simulate.device import DEFAULT_PROFILE, SimDevice
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from edgefleet.wire import API_PREFIX, ServerError, error_class

KEEPALIVE_S = 60
SESSION_EXPIRY_S = 24 * 3600
MISC_EVERY_S = 1.0  # paho's keepalive and retry bookkeeping, for every client
RECONNECT = Backoff(initial=1.0, maximum=30.0)
ENROLL_ATTEMPTS = 5
FAREWELL_S = 10.0


@dataclass(frozen=True)
class SimulationSettings:
    """What `edgefleet simulate` was asked for."""

    devices: int
    server_url: str
    broker_url: str
    trust: TrustRoot
    enroll_token: str | None = None
    prefix: str = "sim"
    profile: str = DEFAULT_PROFILE
    heartbeat_s: float = 30.0
    telemetry_s: float = 60.0
    fail_rate: float = 0.0
    offline_rate: float = 0.0
    offline_seconds: float = 60.0
    serving: tuple[str, str] | None = None  # (name, version) every device serves at start
    forwarded_for: bool = False  # enroll with X-Forwarded-For: an address of the device's own
    http_workers: int = 8
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise UsageError("--devices must be at least 1")
        for name in ("fail_rate", "offline_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if min(self.heartbeat_s, self.telemetry_s, self.offline_seconds) <= 0:
            raise UsageError("intervals and --offline-seconds must be above 0")
        if parse_broker_url(self.broker_url).tls:
            raise UsageError("the simulator connects over mqtt:// only (no TLS client identity)")


# What a timer does when it fires.
HEARTBEAT, TELEMETRY, RECONNECT_NOW = "heartbeat", "telemetry", "reconnect"


@dataclass
class _Node:
    """One device on the network: its state and its MQTT client."""

    device: SimDevice
    client: mqtt.Client
    online: bool = False
    away_until: float = 0.0  # offline on purpose until then (monotonic)
    retries: int = 0


class Simulation:
    """`settings.devices` simulated devices; `enroll()`, then `run(stop)` until `stop` is set."""

    def __init__(self, settings: SimulationSettings) -> None:
        self.settings = settings
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(settings.seed)
        self._address = parse_broker_url(settings.broker_url)
        self._server = settings.server_url.rstrip("/")
        self._nodes = [
            self._node(
                SimDevice(
                    f"{settings.prefix}-{self._rng.getrandbits(48):012x}",
                    profile=settings.profile,
                    model_name=settings.serving[0] if settings.serving else None,
                    model_version=settings.serving[1] if settings.serving else None,
                )
            )
            for _ in range(settings.devices)
        ]
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, str, _Node]] = []
        self._order = itertools.count()
        self._done: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._http = httpx.Client(
            timeout=60, headers={"User-Agent": f"edgefleet-simulate/{__version__}"}
        )
        self._pool = ThreadPoolExecutor(settings.http_workers, thread_name_prefix="simulate-http")
        self._work = Path(tempfile.mkdtemp(prefix="edgefleet-simulate-"))
        self._stopping = False

    @property
    def devices(self) -> list[SimDevice]:
        return [node.device for node in self._nodes]

    # -- enrollment ----------------------------------------------------------------------

    def enroll(self) -> None:
        """Enroll every device over HTTP (in parallel on the pool).

        Raises:
            ServerError: the server refused an enrollment (its reason), or did not answer.
        """
        for done in [self._pool.submit(self._enroll, node.device) for node in self._nodes]:
            done.result()
            self.counts["enrolled"] += 1

    def _enroll(self, device: SimDevice) -> None:
        body = device.enrollment(__version__, self.settings.enroll_token)
        url = f"{self._server}{API_PREFIX}/devices/enroll"
        headers = {}
        if self.settings.forwarded_for:  # as a load balancer names the device it forwards for
            headers["X-Forwarded-For"] = f"10.{'.'.join(map(str, random.randbytes(3)))}"
        for attempt in range(ENROLL_ATTEMPTS):
            try:
                response = self._http.post(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                problem: str = f"no answer from {self._server}: {exc}"
            else:
                if response.status_code in (200, 201):
                    return
                if response.status_code < 500 and response.status_code != 429:
                    raise _server_error(response, f"enrolling {device.id}")
                problem = f"HTTP {response.status_code} from {self._server}"
            if attempt + 1 < ENROLL_ATTEMPTS:
                time.sleep(RECONNECT.delay(attempt, random.Random()))
        raise ServerError(f"enrolling {device.id}: {problem}; is the server running?")

    # -- the network loop ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect every device and serve until `stop` is set; then say goodbye (offline)."""
        now = time.monotonic()
        for node in self._nodes:
            self._connect(node)
        for node in self._nodes:
            self._schedule(now + self._rng.uniform(0, self.settings.telemetry_s), TELEMETRY, node)
        next_misc = now
        while not stop.is_set():
            self._poll(min(self._next_due(), next_misc))
            now = time.monotonic()
            if now >= next_misc:
                for node in self._nodes:
                    node.client.loop_misc()
                next_misc = now + MISC_EVERY_S
        self._farewell()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        for leftover in self._work.iterdir():
            leftover.unlink()
        self._work.rmdir()

    def summary(self) -> str:
        c = self.counts
        return (
            f"simulated {len(self._nodes)} devices: {c['enrolled']} enrolled, "
            f"{c['heartbeats']} heartbeats, {c['telemetry']} telemetry windows, "
            f"{c['directives']} directives ({c['refused']} refused), "
            f"{c['committed']} installs committed, {c['failed']} failed, "
            f"{c['rollbacks']} rollbacks, {c['offline']} offline periods, "
            f"{c['reconnects']} reconnects"
        )

    def _poll(self, due: float) -> None:
        timeout = max(0.0, min(due - time.monotonic(), MISC_EVERY_S))
        for key, events in self._selector.select(timeout):
            client = key.data
            if client is None:
                self._drain_done()
                continue
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, node = heapq.heappop(self._timers)
            self._fire(kind, node)

    def _next_due(self) -> float:
        return self._timers[0][0] if self._timers else time.monotonic() + MISC_EVERY_S

    def _schedule(self, due: float, kind: str, node: _Node) -> None:
        heapq.heappush(self._timers, (due, next(self._order), kind, node))

    def _fire(self, kind: str, node: _Node) -> None:
        now = time.monotonic()
        if kind == RECONNECT_NOW:
            self._connect(node)
        elif kind == HEARTBEAT and node.online:
            if self._rng.random() < self.settings.offline_rate:
                self._go_offline(node)
                return
            self._send(node, TopicKind.HEARTBEAT, node.device.heartbeat(utcnow(), __version__))
            self.counts["heartbeats"] += 1
            self._schedule(now + self.settings.heartbeat_s, HEARTBEAT, node)
        elif kind == TELEMETRY:
            if node.online and node.device.model_version is not None:
                start = utcnow() - dt.timedelta(seconds=self.settings.telemetry_s)
                seconds = max(1, round(self.settings.telemetry_s))
                self._send(node, TopicKind.TELEMETRY, node.device.telemetry(start, seconds=seconds))
                self.counts["telemetry"] += 1
            self._schedule(now + self.settings.telemetry_s, TELEMETRY, node)

    # -- one device's connection ---------------------------------------------------------

    def _node(self, device: SimDevice) -> _Node:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.id, protocol=mqtt.MQTTv5)
        node = _Node(device, client)
        client.user_data_set(node)
        client.max_queued_messages_set(0)
        if self._address.username is not None:
            client.username_pw_set(self._address.username, self._address.password)
        client.will_set(device.topics.presence, Presence.OFFLINE.payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return node

    # paho's external loop: it says which socket to watch, and for what.
    def _on_socket_open(self, client: mqtt.Client, node: _Node, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, node: _Node, sock: Any) -> None:
        self._selector.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, node: _Node, sock: Any) -> None:
        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, node: _Node, sock: Any) -> None:
        self._selector.modify(sock, selectors.EVENT_READ, client)

    def _connect(self, node: _Node) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            node.client.connect(
                self._address.host,
                self._address.port,
                KEEPALIVE_S,
                clean_start=False,
                properties=properties,
            )
        except OSError:
            self._retry(node)

    def _retry(self, node: _Node) -> None:
        delay = RECONNECT.delay(node.retries, self._rng)
        node.retries += 1
        self._schedule(time.monotonic() + delay, RECONNECT_NOW, node)

    def _on_connect(
        self, client: mqtt.Client, node: _Node, flags: Any, reason: Any, _: Any
    ) -> None:
        if reason.is_failure:
            return  # paho closes the socket: _on_disconnect retries
        node.online, node.retries = True, 0
        client.subscribe(node.device.topics.directive, TopicKind.DIRECTIVE.qos)
        client.publish(node.device.topics.presence, Presence.ONLINE.payload, qos=1, retain=True)
        if self.counts["connected"] >= len(self._nodes):
            self.counts["reconnects"] += 1
        self.counts["connected"] += 1
        self._schedule(time.monotonic(), HEARTBEAT, node)

    def _on_disconnect(self, client: mqtt.Client, node: _Node, *_: Any) -> None:
        node.online = False
        if node.away_until > time.monotonic():
            self._schedule(node.away_until, RECONNECT_NOW, node)
        elif not self._stopping:
            self._retry(node)

    def _go_offline(self, node: _Node) -> None:
        self.counts["offline"] += 1
        node.away_until = time.monotonic() + self.settings.offline_seconds
        node.client.publish(
            node.device.topics.presence, Presence.OFFLINE_CLEAN.payload, qos=1, retain=True
        )
        node.client.disconnect()

    def _farewell(self) -> None:
        """Every device says `offline-clean` and disconnects; waits until sent (bounded)."""
        self._stopping = True
        for node in self._nodes:
            if node.online:
                node.client.publish(
                    node.device.topics.presence, Presence.OFFLINE_CLEAN.payload, qos=1, retain=True
                )
                node.client.disconnect()
        deadline = time.monotonic() + FAREWELL_S
        while any(node.client.socket() is not None for node in self._nodes):
            if time.monotonic() > deadline:
                break
            self._poll(time.monotonic() + 0.1)

    def _send(self, node: _Node, kind: TopicKind, message: Message) -> None:
        topic, frame = node.device.frame(kind, message)
        node.client.publish(topic, frame, qos=kind.qos)

    def _report(self, node: _Node, reports: list[StatusReport]) -> None:
        for report in reports:
            self._send(node, TopicKind.STATUS, report)

    # -- directives ----------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, node: _Node, message: mqtt.MQTTMessage) -> None:
        device = node.device
        try:
            directive = verify_directive(
                bytes(message.payload),
                self.settings.trust,
                device_id=device.id,
                last_sequence=device.directive_sequence,
            )
        except UntrustedInputError:
            self.counts["refused"] += 1
            return
        device.directive_sequence = directive.sequence
        self.counts["directives"] += 1
        self._report(node, device.begin(directive, utcnow()))
        if directive.action == "rollback":
            self.counts["rollbacks"] += 1
            self._report(node, device.finish(directive, utcnow()))
        elif directive.action == "install":
            fail = self._rng.random() < self.settings.fail_rate
            self._pool.submit(self._install, node, directive, fail)

    def _install(self, node: _Node, directive: Directive, fail: bool) -> None:
        """On the pool: download and verify, then hand the outcome to the loop."""
        try:
            failure = self._fetch_and_verify(directive)
        except Exception as exc:  # a failed install is reported, never lost
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None and fail:
            failure = "simulated failure (--fail-rate)"

        def finish() -> None:
            self.counts["failed" if failure else "committed"] += 1
            self._report(node, node.device.finish(directive, utcnow(), failure))

        self._done.put(finish)
        with contextlib.suppress(BlockingIOError):  # when full, the loop is awake already
            self._wake_w.send(b"\0")

    def _drain_done(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                self._done.get_nowait()()
            except queue.Empty:
                return

    def _fetch_and_verify(self, directive: Directive) -> str | None:
        """None when the bundle downloaded and verified; else why not."""
        bundle = directive.bundle
        assert bundle is not None
        url = next((s.url for s in directive.sources if isinstance(s, HttpSource)), None)
        if url is None:
            return "no HTTP source in the directive (the simulator downloads over HTTP)"
        with tempfile.NamedTemporaryFile(dir=self._work, suffix=".efb") as part:
            digest = hashlib.sha256()
            with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    return f"download failed: HTTP {response.status_code} from {url}"
                for chunk in response.iter_bytes(1 << 16):
                    digest.update(chunk)
                    part.write(chunk)
            part.flush()
            if part.tell() != bundle.length or digest.hexdigest() != bundle.sha256:
                return "download does not match the directive's length and SHA-256"
            try:
                verify_bundle(Path(part.name), self.settings.trust)
            except EdgefleetError as exc:
                return f"bundle refused: {exc}"
        return None


def _server_error(response: httpx.Response, doing: str) -> EdgefleetError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    cls = error_class(body.get("error") if isinstance(body, dict) else None) or ServerError
    return cls(f"{doing}: HTTP {response.status_code}: {detail or response.text[:200]}")
