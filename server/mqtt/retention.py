"""Retention: old telemetry buckets go, silent devices are marked offline.

Run periodically (the runner calls it next to the rollout driver). Both steps
are single set-based statements, idempotent and safe with several replicas.
A device is marked offline when its `last_seen` is older than
`settings.offline_after`: its Last Will may never have reached us (a broker
restart forgets sessions; presence is unsigned and may be lost), and no
heartbeat means no news. Devices never seen (last_seen NULL) are left alone:
their `online` is already false unless presence said otherwise.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.orm import Session

from edgefleet.server.db.models import Device, TelemetryBucket
from edgefleet.server.settings import ServerSettings


@dataclass(frozen=True)
class RetentionResult:
    buckets_deleted: int
    devices_marked_offline: int


def apply_retention(
    session: Session, settings: ServerSettings, now: dt.datetime
) -> RetentionResult:
    """Delete telemetry buckets older than `telemetry_retention`; mark silent devices offline.

    Runs inside the caller's unit of work.

    Raises:
        sqlalchemy errors, which `Database.session` turns into StorageError.
    """
    cutoff = now - settings.telemetry_retention
    deleted = session.execute(delete(TelemetryBucket).where(TelemetryBucket.bucket_start < cutoff))
    silent_since = now - settings.offline_after
    marked = session.execute(
        update(Device)
        .where(Device.online.is_(True))
        .where(Device.last_seen.is_not(None))
        .where(Device.last_seen < silent_since)
        .values(online=False)
        .execution_options(synchronize_session=False)
    )
    return RetentionResult(_rowcount(deleted), _rowcount(marked))


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


__all__ = ["RetentionResult", "apply_retention"]
