"""The signed fleet timestamp: published, retained, by one replica at a fixed period.

With each, under its sequence and dates, the fields this server accepts in
device messages (`edgefleet.mqtt.fieldsets`), so that agents newer than the
server leave out what it would refuse.

A device that sees no fresh fleet timestamp knows it is being frozen out (a
stolen broker can withhold messages, never forge them). Invariants:
- one replica publishes: the one holding the lease "fleet-timestamp"; the
  lease is renewed at every tick, so another replica takes over within
  `lease_ttl` after the holder stops;
- sequences come from the shared counter "fleet-timestamp" (atomic increment
  in the database), so they keep increasing across replicas and restarts;
  a sequence consumed by a transaction whose publication then fails is simply
  skipped (devices need increasing, not contiguous, sequences);
- after the broker link reconnects (`publish_again`), the next tick publishes a
  new timestamp at once: a restarted broker forgot the retained one;
- the timestamp is published after the transaction that took its sequence has
  committed, and it expires `fleet_timestamp_ttl` after issue, longer than the
  period, so a device always holds a valid one while the server is healthy.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

from edgefleet.errors import UsageError
from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    FLEET_TIMESTAMP_QOS,
    FLEET_TIMESTAMP_RETAINED,
    FleetAccepts,
    FleetTimestamp,
    accepted_fields,
    fleet_accepts_topic,
    fleet_timestamp_topic,
    sign_fleet_accepts,
    sign_fleet_timestamp,
)
from edgefleet.server.db.database import Database
from edgefleet.server.leases import acquire_lease, next_counter
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import format_time, utcnow

log = logging.getLogger(__name__)

LEASE_NAME = "fleet-timestamp"
COUNTER_NAME = "fleet-timestamp"


class FleetTimestamper:
    """Publishes the signed fleet timestamp when this replica holds the lease."""

    def __init__(
        self,
        db: Database,
        server_keys: Sequence[SigningKey],
        trust_version: int,
        publisher: Publisher,
        settings: ServerSettings,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        """Raises: UsageError when no server key is given or `trust_version` < 1."""
        if not server_keys:
            raise UsageError("the fleet timestamp needs at least one server key")
        if trust_version < 1:
            raise UsageError(f"trust_version must be >= 1, got {trust_version}")
        if settings.fleet_timestamp_ttl <= settings.fleet_timestamp_period:
            # Devices would see gaps with no valid timestamp between two publications.
            log.warning(
                "fleet_timestamp_ttl %s is not longer than the period %s",
                settings.fleet_timestamp_ttl,
                settings.fleet_timestamp_period,
            )
        self.db = db
        self.server_keys = list(server_keys)
        self.trust_version = trust_version
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.accepted = accepted_fields()  # this version's schemas: the same all its life
        self.last_published: dt.datetime | None = None
        self.last_sequence: int | None = None

    def tick(self) -> bool:
        """Renew the lease and publish a new timestamp when due; True when one was published.

        Due: at the first tick holding the lease (also after holding it again
        following a loss, since another replica published meanwhile), then
        whenever `fleet_timestamp_period` has passed since this replica's last
        publication.

        Raises:
            StorageError: the database failed (nothing was published).
            Whatever the publisher raises (the sequence is then skipped).
        """
        now = self.clock()
        with self.db.session() as session:
            held = acquire_lease(
                session, LEASE_NAME, self.settings.replica_id, self.settings.lease_ttl, now=now
            )
            if not held:
                self.last_published = None  # publish at once if the lease comes back
                return False
            if (
                self.last_published is not None
                and now - self.last_published < self.settings.fleet_timestamp_period
            ):
                return False
            sequence = next_counter(session, COUNTER_NAME)
            payload = self.sign(sequence, now)
        for topic, document in (
            (fleet_timestamp_topic(), payload),
            (fleet_accepts_topic(), self.sign_accepts(sequence, now)),
        ):
            self.publisher.publish(
                topic, document, qos=FLEET_TIMESTAMP_QOS, retain=FLEET_TIMESTAMP_RETAINED
            )
        self.last_published = now
        self.last_sequence = sequence
        log.debug("published fleet timestamp %d", sequence)
        return True

    def publish_again(self) -> None:
        """Make the next tick publish (if this replica holds the lease), due or not."""
        self.last_published = None

    def sign(self, sequence: int, issued: dt.datetime) -> bytes:
        """The signed fleet timestamp bytes for `sequence` issued at `issued`."""
        timestamp = FleetTimestamp.model_validate(
            {
                "issued": format_time(issued),
                "expires": format_time(issued + self.settings.fleet_timestamp_ttl),
                "sequence": sequence,
                "trust_root_version": self.trust_version,
            }
        )
        return sign_fleet_timestamp(timestamp, self.server_keys)

    def sign_accepts(self, sequence: int, issued: dt.datetime) -> bytes:
        """The signed announcement of the fields this server accepts, dated as the
        timestamp of `sequence`."""
        accepts = FleetAccepts.model_validate(
            {
                "issued": format_time(issued),
                "expires": format_time(issued + self.settings.fleet_timestamp_ttl),
                "sequence": sequence,
                "messages": self.accepted,
            }
        )
        return sign_fleet_accepts(accepts, self.server_keys)


__all__ = ["COUNTER_NAME", "LEASE_NAME", "FleetTimestamper"]
