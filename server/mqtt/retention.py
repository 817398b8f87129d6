"""Retention: old telemetry buckets, heartbeat history, presence changes and delivered
webhook events go, heartbeat history is downsampled with age, silent devices are marked
offline.

`run_retention` is the step of the runner's retention worker (every 30 s), on
every replica. Each deletion is a single set-based statement, idempotent and
safe with several replicas; downsampling reads the rows it merges locked
(PostgreSQL), so two replicas never merge the same rows
(`edgefleet.server.history.downsample`). A device is marked offline when its
`last_seen` is older than `settings.offline_after`: its Last Will may never
have reached us (a broker restart forgets sessions; presence is unsigned and
may be lost), and no heartbeat means no news; the update returns the devices
it changed, and each gets a `PresenceChange` ("no heartbeat for 120 s"). On
PostgreSQL it locks those devices in id order (as ingestion and the rollout
driver do) and skips one another unit of work holds: no deadlock, no wait.
Devices never seen (last_seen NULL) are left alone: their `online` is already
false unless presence said otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import CursorResult, delete, insert, select, update
from sqlalchemy.orm import Session

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    Device,
    HeartbeatSample,
    PresenceChange,
    TelemetryBucket,
    TelemetryLatest,
    WebhookDelivery,
)
from edgefleet.server.db.rows import in_chunks
from edgefleet.server.history import downsample
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    buckets_deleted: int
    devices_marked_offline: int
    deliveries_deleted: int  # webhook events delivered longer ago than the retention
    heartbeat_rows_deleted: int = 0  # heartbeat history older than the retention
    heartbeat_rows_merged: int = 0  # finer heartbeat slots merged into coarser ones
    presence_changes_deleted: int = 0


def apply_retention(
    session: Session, settings: ServerSettings, now: dt.datetime
) -> RetentionResult:
    """Delete telemetry buckets, heartbeat history, presence changes, and webhook
    events delivered, longer ago than `telemetry_retention`; downsample heartbeat
    history; mark silent devices offline (each with a presence change).

    Runs inside the caller's unit of work.

    Raises:
        sqlalchemy errors, which `Database.session` turns into StorageError.
    """
    cutoff = now - settings.telemetry_retention
    deleted = session.execute(delete(TelemetryBucket).where(TelemetryBucket.bucket_start < cutoff))
    # A newest bucket deleted means every bucket of that device and version was.
    session.execute(delete(TelemetryLatest).where(TelemetryLatest.bucket_start < cutoff))
    delivered = session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.delivered_at < cutoff)
    )
    heartbeats = session.execute(delete(HeartbeatSample).where(HeartbeatSample.slot_start < cutoff))
    presence = session.execute(delete(PresenceChange).where(PresenceChange.at < cutoff))
    merged = downsample(session, now, lock=session.get_bind().dialect.name != "sqlite")
    marked = _mark_silent_offline(session, now - settings.offline_after)
    if marked:
        reason = f"no heartbeat for {int(settings.offline_after.total_seconds())} s"
        session.execute(
            insert(PresenceChange),
            [
                {"device_id": device_id, "at": now, "online": False, "reason": reason}
                for device_id in marked
            ],
        )
    return RetentionResult(
        _rowcount(deleted),
        len(marked),
        _rowcount(delivered),
        heartbeat_rows_deleted=_rowcount(heartbeats),
        heartbeat_rows_merged=merged,
        presence_changes_deleted=_rowcount(presence),
    )


def _mark_silent_offline(session: Session, silent_since: dt.datetime) -> list[str]:
    """Set offline the online devices last seen before `silent_since`; return their ids.

    On PostgreSQL the rows are locked in id order, the order ingestion and the
    rollout driver lock devices in, and a row locked by one of them is skipped:
    it is being written, so its device is not silent (no deadlock, no wait).
    """
    silent = (
        select(Device.id)
        .where(Device.online.is_(True))
        .where(Device.last_seen.is_not(None))
        .where(Device.last_seen < silent_since)
        .order_by(Device.id)
    )
    if session.get_bind().dialect.name != "sqlite":
        silent = silent.with_for_update(skip_locked=True)
    ids = list(session.scalars(silent))
    for chunk in in_chunks(ids):
        session.execute(
            update(Device)
            .where(Device.id.in_(chunk))
            .values(online=False)
            .execution_options(synchronize_session=False)
        )
    return ids


def run_retention(db: Database, settings: ServerSettings) -> RetentionResult:
    """`apply_retention` now, in a unit of work of its own; what it changed is logged.

    Raises:
        StorageError: the database failed.
    """
    with db.session() as session:
        result = apply_retention(session, settings, utcnow())
    if any(dataclasses.astuple(result)):
        log.info(
            "retention: %d telemetry bucket(s), %d heartbeat slot(s), %d presence change(s) "
            "and %d delivered webhook event(s) deleted, %d heartbeat slot(s) downsampled, "
            "%d silent device(s) marked offline",
            result.buckets_deleted,
            result.heartbeat_rows_deleted,
            result.presence_changes_deleted,
            result.deliveries_deleted,
            result.heartbeat_rows_merged,
            result.devices_marked_offline,
        )
    return result


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


__all__ = ["RetentionResult", "apply_retention", "run_retention"]
