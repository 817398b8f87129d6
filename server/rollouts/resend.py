"""Unanswered directives sent again when their device comes back or the broker forgot them.

A broker keeps a directive for an offline device in its persistent session,
but not always: the embedded broker keeps sessions in memory, so a restart of
it (or of the server it runs in) forgets what it queued, and a device the
database still thinks online never gets its directive. So the latest install
or rollback directive of a device in an active rollout that has not answered
it (`notified`, or `rolling_back`) is published again, the same signed bytes
(`DirectiveIssuer.resign`), when:

- ingestion saw the device come back (`Returns.add`: its presence said online,
  a new connection, even one the database never saw end; or its first message
  after `offline_after` of silence);
- the server's broker link connected again (`connects` grew; the first
  connection counts too: a server that restarted may have lost what it
  published, and with it the embedded broker's queue).

Each of these sends a device's directive at most once. A device that already
accepted the directive refuses the repeated sequence, so it never acts twice.
Left out: a `notified` device marked offline before it answered (notify.py
gives it a new directive), and a directive past its expiry.

Sending again only reads the database, so no lease is needed: the replica that
saw the device come back sends it, whichever replica drives its rollout.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Collection, Iterable

from sqlalchemy import and_, or_, select

from edgefleet.errors import PublishError
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, DeviceState, Rollout, RolloutDevice
from edgefleet.server.db.rows import in_chunks
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective, publish_directive
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.rollouts.machine import ACTIVE_STATES
from edgefleet.server.rollouts.notify import OFFLINE_MARK

log = logging.getLogger(__name__)

_ACTIONS = {DeviceState.NOTIFIED: "install", DeviceState.ROLLING_BACK: "rollback"}


class Returns:
    """Devices ingestion saw come back, until the driver takes them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: set[str] = set()

    def add(self, device_ids: Iterable[str]) -> None:
        with self._lock:
            self._devices.update(device_ids)

    def take(self) -> set[str]:
        with self._lock:
            taken, self._devices = self._devices, set()
        return taken


def unanswered(
    db: Database,
    issuer: DirectiveIssuer,
    now: dt.datetime,
    device_ids: Collection[str] | None = None,
) -> list[OutgoingDirective]:
    """The unanswered directives of `device_ids` (None: of every online device), signed again.

    Raises:
        StorageError: the database failed.
    """
    waiting = or_(
        and_(
            RolloutDevice.state == DeviceState.NOTIFIED,
            or_(RolloutDevice.reason.is_(None), RolloutDevice.reason != OFFLINE_MARK),
        ),
        RolloutDevice.state == DeviceState.ROLLING_BACK,
    )
    query = (
        select(RolloutDevice, BundleRow)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .join(BundleRow, BundleRow.id == Rollout.bundle_id)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(
            Rollout.state.in_(ACTIVE_STATES),
            waiting,
            RolloutDevice.directive_sequence.is_not(None),
            RolloutDevice.notified_at > now - issuer.settings.directive_ttl,
        )
        .order_by(RolloutDevice.device_id)
    )
    if device_ids is None:
        filters = [Device.online.is_(True)]
    else:
        filters = [Device.id.in_(chunk) for chunk in in_chunks(sorted(device_ids))]
    directives: list[OutgoingDirective] = []
    with db.session() as session:
        for where in filters:
            for rd, bundle in session.execute(query.where(where)).all():
                assert rd.directive_sequence is not None and rd.notified_at is not None
                directives.append(
                    issuer.resign(
                        rd.device_id,
                        bundle,
                        action=_ACTIONS[rd.state],
                        sequence=rd.directive_sequence,
                        shadow=rd.shadow,
                        issued=rd.notified_at,
                    )
                )
    return directives


def send_again(publisher: Publisher, directives: Iterable[OutgoingDirective]) -> int:
    """Publish `directives`; returns how many the broker took.

    Stops at the first the broker refuses: the link is down again, and its next
    connection sends them all.
    """
    sent = 0
    for directive in directives:
        try:
            publish_directive(publisher, directive)
        except PublishError as exc:
            log.warning("unanswered directives not sent again: %s", exc)
            break
        sent += 1
    return sent


__all__ = ["Returns", "send_again", "unanswered"]
