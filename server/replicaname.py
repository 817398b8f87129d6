"""The replica's name: its MQTT session, claimed in the database so no two replicas share it.

A replica's broker session (client id `edgefleet-server-<name>`, clean start off)
outlives a crash: the broker queues the replica's share of the device messages
for it, and the replica started again under the same name resumes the session
and reads them. The name is the host's name unless `--replica-name` says
otherwise, so it survives a restart.

Two live replicas under one name would take the session from each other at
every reconnect, so a replica claims its name as a lease (`replica-name:<name>`,
owned by the process's `replica_id`) before it connects, and renews it while
it runs. A name still held by another process is waited for up to one
`NAME_TTL` plus a poll (a killed replica's claim expires by then); a name
renewed meanwhile belongs to a running replica and the start is refused.
A clean stop releases the name.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from edgefleet.errors import UsageError
from edgefleet.server.db.database import Database
from edgefleet.server.leases import acquire_lease, lease_holder, release_lease
from edgefleet.server.settings import ServerSettings
from edgefleet.worker import Worker

log = logging.getLogger(__name__)

NAME_TTL = dt.timedelta(seconds=4)  # short: a restart waits out a killed holder's claim
POLL_S = 0.5


def lease_name(replica_name: str) -> str:
    return f"replica-name:{replica_name}"


def claim_replica_name(db: Database, settings: ServerSettings) -> None:
    """Hold the lease on `settings.replica_name` for this process, waiting out a killed
    holder's claim.

    Raises:
        UsageError: a running replica holds the name.
        StorageError: the database failed.
    """
    name = lease_name(settings.replica_name)
    deadline = time.monotonic() + NAME_TTL.total_seconds() + POLL_S
    waiting = False
    while True:
        with db.session() as session:
            if acquire_lease(session, name, settings.replica_id, NAME_TTL):
                return
            holder = lease_holder(session, name)
        if time.monotonic() >= deadline:
            raise UsageError(
                f"replica name {settings.replica_name!r} is in use by a running replica "
                f"({holder}): give each replica its own --replica-name"
            )
        if not waiting:
            waiting = True
            log.info(
                "replica name %r is held by %s: waiting up to %.0f s for it to be released",
                settings.replica_name,
                holder,
                NAME_TTL.total_seconds(),
            )
        time.sleep(POLL_S)


def name_worker(db: Database, settings: ServerSettings) -> Worker:
    """Renews the claim on the replica's name, three times per `NAME_TTL`."""

    def renew() -> None:
        with db.session() as session:
            if acquire_lease(
                session, lease_name(settings.replica_name), settings.replica_id, NAME_TTL
            ):
                return
            holder = lease_holder(session, lease_name(settings.replica_name))
        log.error(
            "replica name %r was claimed by %s while this replica could not renew it: "
            "the two share one MQTT session; stop one and give each its own --replica-name",
            settings.replica_name,
            holder,
        )

    return Worker("edgefleet-replica-name", renew, NAME_TTL.total_seconds() / 3)


def release_replica_name(db: Database, settings: ServerSettings) -> None:
    """Give the name up (a clean stop), so a replica started under it need not wait."""
    with db.session() as session:
        release_lease(session, lease_name(settings.replica_name), settings.replica_id)


__all__ = ["NAME_TTL", "claim_replica_name", "lease_name", "name_worker", "release_replica_name"]
