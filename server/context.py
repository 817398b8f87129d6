"""Everything the HTTP API needs from the running server, in one value.

The runner (or a test) builds a `ServerContext` once and hands it to
`edgefleet.server.api.app.create_app`; nothing in the API opens a database, reads
a file of settings or starts a thread at import time.

`publisher` is wrapped in a `CountingPublisher` when the context is built, so
whatever publishes through `context.publisher` (the directive issuer, the
rollout driver) is counted for `/metrics`. Give the driver `context.publisher`,
not the raw link, to have its directives counted.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry

from edgefleet.errors import MessageSchemaError
from edgefleet.mqtt import parse_device_topic
from edgefleet.server.db.database import Database
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.mqtt.link import LinkStatus
from edgefleet.server.rollouts.stagetelemetry import StageTelemetryCache
from edgefleet.server.settings import ServerSettings
from edgefleet.server.trustroots import TrustRoots, publish_trust_root
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot

if TYPE_CHECKING:
    from edgefleet.fleetca import FleetCa
    from edgefleet.server.bundles import BundleStore
    from edgefleet.server.certificates import CrlFile
    from edgefleet.server.directives import DirectiveIssuer
    from edgefleet.server.mqtt.ingest import DeadLetter, Replay


class Ingestion(Protocol):
    """What the MQTT ingestion exposes for /metrics, /health and the dead letters' replay
    (`Ingestor` has these)."""

    @property
    def counts(self) -> Mapping[str, int]:
        """Messages accepted, by kind (status, heartbeat, telemetry, ...)."""
        ...

    @property
    def refused(self) -> Mapping[str, int]:
        """Messages refused, by reason (unknown-device, device-signature, ...)."""
        ...

    @property
    def dead_lettered(self) -> Mapping[str, int]:
        """Messages accepted that the database refused to store, by kind."""
        ...

    @property
    def last_dead_letter(self) -> DeadLetter | None:
        """The last device whose messages the database refused: when, what, why."""
        ...

    def replay(self, letter_id: int) -> Replay:
        """Take a dead letter's messages again and write them (raises NotFoundError)."""
        ...


class LinkView(Protocol):
    """The MQTT link as the health check and the metrics see it (`ServerLink`)."""

    def status(self) -> LinkStatus:
        """Connected or not, since when, connects and losses."""
        ...


class BrokerView(Protocol):
    """The embedded broker as the health check and the metrics see it (`EmbeddedBroker`)."""

    @property
    def restarts(self) -> int:
        """Children started again after one ended unasked."""
        ...


class KeyCache(Protocol):
    """The ingestion's cache of device public keys (`DeviceKeyCache`)."""

    def invalidate(self, device_id: str) -> None:
        """Forget `device_id`'s key: it was (re-)enrolled."""
        ...


class CountingPublisher:
    """A `Publisher` that counts what passes through it, by topic kind.

    Device topics count under their kind (`directive`, `blocks_data`, ...),
    anything else under `other`. Thread-safe: the API, the driver and the
    fleet timestamper publish from different threads.
    """

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        """Publish through the wrapped publisher, then count (only what did not raise)."""
        self.inner.publish(topic, payload, qos=qos, retain=retain)
        kind = _topic_kind(topic)
        with self._lock:
            self._counts[kind] += 1

    @property
    def counts(self) -> dict[str, int]:
        """Messages published so far, by topic kind (a copy)."""
        with self._lock:
            return dict(self._counts)


def _topic_kind(topic: str) -> str:
    try:
        _device, kind = parse_device_topic(topic)
    except MessageSchemaError:  # the fleet timestamp, or anything not per device
        return "other"
    return kind.name.lower()


@dataclass
class ServerContext:
    """The running server's parts that the API uses.

    `issuer` is None on a server without a server key loaded (read-only use);
    `ingest` is None when no MQTT ingestion runs in this process (tests);
    `device_keys`, when given, is told about every enrollment.
    `link` is the MQTT link (None: no link in this process, as in most tests) and
    `broker` the embedded broker (None: an external one), for health and metrics.
    `ca` is the fleet CA that signs devices' certificates (None: the server issues
    none); `crl`, when given, is refreshed after every device removal.
    `trust` holds the newest trust root: each version adopted (pushed here or
    stored by another replica) becomes the one `bundles` verifies releases with,
    and is published retained through `publisher`.
    `registry` is this server's own Prometheus registry: two apps in one
    process (tests) never share metrics.
    `stage_telemetry` keeps large rollout stages' telemetry readings a few seconds, for
    the status routes and the rollout driver alike (give the driver this one).
    """

    settings: ServerSettings
    db: Database
    trust: TrustRoots
    bundles: BundleStore
    publisher: Publisher
    issuer: DirectiveIssuer | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    clock: Callable[[], dt.datetime] = utcnow
    ingest: Ingestion | None = None
    link: LinkView | None = None
    broker: BrokerView | None = None
    device_keys: KeyCache | None = None
    ca: FleetCa | None = None
    crl: CrlFile | None = None
    stage_telemetry: StageTelemetryCache = field(default_factory=StageTelemetryCache)

    def __post_init__(self) -> None:
        if not isinstance(self.publisher, CountingPublisher):
            self.publisher = CountingPublisher(self.publisher)
        self.trust.add_listener(self._adopt_trust_root)

    def _adopt_trust_root(self, root: TrustRoot) -> None:
        self.bundles.trust = root
        publish_trust_root(self.publisher, root)

    @property
    def published(self) -> dict[str, int]:
        """Messages published through `publisher`, by topic kind."""
        assert isinstance(self.publisher, CountingPublisher)
        return self.publisher.counts


__all__ = [
    "BrokerView",
    "CountingPublisher",
    "Ingestion",
    "KeyCache",
    "LinkView",
    "ServerContext",
]
