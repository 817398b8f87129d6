"""Dead letters: one device's messages the database refused to store, kept as they arrived.

Ingestion (`edgefleet.server.mqtt.ingest`) sets aside what the database
refuses of one device so that the fleet's messages are still stored. What it
set aside is kept here, one row per device and flush: the signed messages as
the device sent them (topic and bytes), when each arrived, what they were by
kind and the database's error. An operator can read them, replay them once
the cause is fixed (`Ingestor.replay`: the same checks as any message, the
signature included) or discard them. Only the newest `dead_letters_kept` are
kept, so a device whose every message is refused cannot fill the database;
rows go with their device.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import DeadLetterRow
from edgefleet.server.errors import NotFoundError
from edgefleet.server.mqtt.batch import KeptMessage
from edgefleet.timefmt import format_time


def describe_dropped(dropped: dict[str, int]) -> str:
    """Messages by kind in words: "1 status, 2 telemetry"."""
    return ", ".join(f"{count} {kind}" for kind, count in dropped.items() if count)


def keep_dead_letter(
    session: Session,
    device_id: str,
    at: dt.datetime,
    error: str,
    dropped: dict[str, int],
    messages: Sequence[KeptMessage],
    kept: int,
) -> int:
    """Add a dead letter to `session`'s unit of work, and delete all but the newest `kept`
    (at least this one).

    Returns its id.
    """
    row = DeadLetterRow(
        device_id=device_id,
        at=at,
        error=error,
        dropped=dropped,
        messages=[
            {
                "topic": message.topic,
                "payload": base64.b64encode(message.payload).decode("ascii"),
                "received_at": format_time(message.received_at),
            }
            for message in messages
        ],
    )
    session.add(row)
    session.flush()
    oldest_kept = session.scalar(
        select(DeadLetterRow.id).order_by(DeadLetterRow.id.desc()).offset(max(kept, 1) - 1).limit(1)
    )
    if oldest_kept is not None:
        session.execute(delete(DeadLetterRow).where(DeadLetterRow.id < oldest_kept))
    return row.id


def list_dead_letters(
    session: Session, device_id: str | None = None, limit: int = 100
) -> list[DeadLetterRow]:
    """Newest first."""
    query = select(DeadLetterRow).order_by(DeadLetterRow.id.desc()).limit(limit)
    if device_id is not None:
        query = query.where(DeadLetterRow.device_id == device_id)
    return list(session.scalars(query))


def count_dead_letters(session: Session) -> int:
    """How many are kept (not replayed nor discarded)."""
    return int(session.scalar(select(func.count()).select_from(DeadLetterRow)) or 0)


def get_dead_letter(session: Session, letter_id: int) -> DeadLetterRow:
    """Raises: NotFoundError."""
    row = session.get(DeadLetterRow, letter_id)
    if row is None:
        raise NotFoundError(
            f"no dead letter {letter_id} (replayed or discarded?): "
            "`edgefleet dead-letters list` lists them"
        )
    return row


def letters_of(row: DeadLetterRow) -> list[tuple[str, bytes]]:
    """The kept messages' topics and signed bytes, in arrival order."""
    return [(message["topic"], base64.b64decode(message["payload"])) for message in row.messages]


def discard_dead_letter(session: Session, letter_id: int) -> DeadLetterRow:
    """Delete a dead letter; returns it. Raises: NotFoundError."""
    row = get_dead_letter(session, letter_id)
    session.delete(row)
    return row


__all__ = [
    "count_dead_letters",
    "describe_dropped",
    "discard_dead_letter",
    "get_dead_letter",
    "keep_dead_letter",
    "letters_of",
    "list_dead_letters",
]
