"""Retention: old telemetry buckets and delivered webhook events go, silent devices
are marked offline.

`run_retention` is the step of the runner's retention worker (every 30 s). Each
step is a single set-based statement, idempotent and safe with several replicas.
A device is marked offline when its `last_seen` is older than
`settings.offline_after`: its Last Will may never have reached us (a broker
restart forgets sessions; presence is unsigned and may be lost), and no
heartbeat means no news. Devices never seen (last_seen NULL) are left alone:
their `online` is already false unless presence said otherwise.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.orm import Session

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, TelemetryBucket, WebhookDelivery
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    buckets_deleted: int
    devices_marked_offline: int
    deliveries_deleted: int  # webhook events delivered longer ago than the retention


def apply_retention(
    session: Session, settings: ServerSettings, now: dt.datetime
) -> RetentionResult:
    """Delete telemetry buckets, and webhook events delivered, longer ago than
    `telemetry_retention`; mark silent devices offline.

    Runs inside the caller's unit of work.

    Raises:
        sqlalchemy errors, which `Database.session` turns into StorageError.
    """
    cutoff = now - settings.telemetry_retention
    deleted = session.execute(delete(TelemetryBucket).where(TelemetryBucket.bucket_start < cutoff))
    delivered = session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.delivered_at < cutoff)
    )
    silent_since = now - settings.offline_after
    marked = session.execute(
        update(Device)
        .where(Device.online.is_(True))
        .where(Device.last_seen.is_not(None))
        .where(Device.last_seen < silent_since)
        .values(online=False)
        .execution_options(synchronize_session=False)
    )
    return RetentionResult(_rowcount(deleted), _rowcount(marked), _rowcount(delivered))


def run_retention(db: Database, settings: ServerSettings) -> RetentionResult:
    """`apply_retention` now, in a unit of work of its own; what it changed is logged.

    Raises:
        StorageError: the database failed.
    """
    with db.session() as session:
        result = apply_retention(session, settings, utcnow())
    if result.buckets_deleted or result.devices_marked_offline or result.deliveries_deleted:
        log.info(
            "retention: %d telemetry bucket(s) and %d delivered webhook event(s) deleted, "
            "%d silent device(s) marked offline",
            result.buckets_deleted,
            result.deliveries_deleted,
            result.devices_marked_offline,
        )
    return result


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


__all__ = ["RetentionResult", "apply_retention", "run_retention"]
