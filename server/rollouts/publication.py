"""Publishing a tick's directives after its unit of work committed.

Each directive is handed to the publisher on its own. One the broker did not
take (`PublishError`: not connected, queue full, refused) is undone in the
database, and the others are still published: an install goes back to
pending (its attempt not counted, its notification time cleared, so it takes
no room in the rate limit) and a rollback back to installing, and the next
tick sends them again instead of waiting for the device's timeout. A device
that got a newer directive meanwhile (another replica) is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select

from edgefleet.errors import PublishError
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import DeviceState, RolloutDevice
from edgefleet.server.directives import OutgoingDirective, publish_directive
from edgefleet.server.mqtt.interfaces import Publisher

log = logging.getLogger(__name__)

NOT_PUBLISHED = "directive not published (broker unavailable)"
ROLLBACK_NOT_PUBLISHED = "rollback directive not published (broker unavailable)"


def publish_directives(
    db: Database,
    publisher: Publisher,
    rollout_id: int,
    outgoing: Sequence[OutgoingDirective],
    counted: set[str],
) -> int:
    """Publish `outgoing`; undo those the broker did not take. Returns how many it took.

    `counted`: the devices whose install counted as a new attempt.

    Raises:
        StorageError: undoing the unpublished directives failed (their devices
            then wait for their timeout, as after a crash).
    """
    refused: list[OutgoingDirective] = []
    first_error: PublishError | None = None
    for directive in outgoing:
        try:
            publish_directive(publisher, directive)
        except PublishError as exc:
            refused.append(directive)
            first_error = first_error or exc
    if refused:
        log.warning(
            "rollout %d: %d of %d directive(s) not published, sent again next tick: %s",
            rollout_id,
            len(refused),
            len(outgoing),
            first_error,
        )
        _undo(db, rollout_id, refused, counted)
    return len(outgoing) - len(refused)


def _undo(
    db: Database, rollout_id: int, refused: Sequence[OutgoingDirective], counted: set[str]
) -> None:
    sequences = {d.device_id: d.sequence for d in refused}
    with db.session() as session:
        rows = session.scalars(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.device_id.in_(list(sequences)),
            )
        )
        for rd in rows:
            if rd.directive_sequence != sequences[rd.device_id]:
                continue
            if rd.state is DeviceState.NOTIFIED:
                rd.state = DeviceState.PENDING
                if rd.device_id in counted:
                    rd.attempts = max(0, rd.attempts - 1)
                rd.notified_at = None
                rd.reason = NOT_PUBLISHED
            elif rd.state is DeviceState.ROLLING_BACK:
                rd.state = DeviceState.INSTALLING
                rd.reason = ROLLBACK_NOT_PUBLISHED


__all__ = ["publish_directives"]
