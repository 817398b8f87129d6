"""Writing a batch of ingested messages in one unit of work (see `ingest.py`).

- devices are read once per batch (row locks on PostgreSQL, in id order, so
  replicas sharing the load neither deadlock with each other nor lose updates);
- status reports at or below `Device.status_sequence` are duplicates (at least
  once delivery) and dropped; the rest are inserted in sequence order and all
  but the newest `status_reports_kept` per device deleted. A COMMITTED report
  moves the served version, unless it is a shadow install's (the agent's
  reason says it runs in shadow; heartbeats carry the truth either way);
- heartbeats are ordered by their `sent_at`: one sent before the heartbeat
  kept (in the batch, or stored in `Device.heartbeat`) changes nothing, so a
  replayed heartbeat or one another replica flushes late cannot move
  `model_version` or `install_state` back. One sent in the same second is
  applied (`sent_at` has whole seconds; an agent may beat twice in one).
  A stored heartbeat dated more than `max_clock_ahead` after the new one
  arrived (kept before ingestion refused such dates) orders nothing;
- the newest of a heartbeat and the status reports sets `install_state`,
  except a `refused` report: a refused install changes nothing on the device
  (its agent rests where it was), so it is kept as history only;
- a heartbeat that carries `security_floors` replaces the stored ones (one
  that does not, from an older agent, leaves them as they are);
- a change of `Device.online` adds a `PresenceChange` row with the reason of
  the message that made it (none when the device's state did not change);
- `write` returns the devices that came back: online after offline, a new
  connection (presence online, even when the database had them online: a
  restarted embedded broker lost them without a Last Will), or heard from after `return_gap` (the
  server's `offline_after`) of silence; the rollout side sends them their
  unanswered directives again (rollouts/resend.py);
- every heartbeat is merged into its device's 1-minute `HeartbeatSample` slot
  (`edgefleet.server.history`), the same way as telemetry buckets;
- a diagnostics answer is stored on the request it names
  (`edgefleet.server.diagnostics.record_answer`); one that matches no open
  request (expired, answered already, another device's) is dropped and logged;
- telemetry buckets are merged into the stored ones or inserted, with their
  running sums (`edgefleet.server.mqtt.buckets`). When another replica inserted
  the same bucket first, the unit of work fails on the unique key; the caller
  retries and merges into that row;
- each device that sent telemetry gets its `Device.health` from its requests,
  errors and fallbacks of the last hour (`history.TELEMETRY_SPAN`, its buckets
  that start within the hour before the batch's newest message, every version):
  one read of at most 12 buckets a device and version per flush, so one quiet
  window does not reset a failing device, and an hour without requests makes
  it `unknown`.

A batch is never modified here, so a failed write can be retried as it is.
`IngestBatch.device_parts` cuts a batch into one batch per device (in device id
order, each written by `write` like any batch), so the ingestor can write apart
what one device sent when the database refuses the batch as a whole, and
`IngestBatch.contents` says what a batch holds, for the log line of a part the
database refused. `IngestBatch.kept` holds the signed messages as they arrived
(all but presence, which only says online or offline), so a part the database
refuses can be kept as it came and replayed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edgefleet.errors import MalformedDocumentError
from edgefleet.mqtt.messages import DiagnosticsReport, Heartbeat, StatusReport
from edgefleet.server.db.models import Device, PresenceChange, StatusReportRow
from edgefleet.server.db.rows import in_chunks
from edgefleet.server.diagnostics import record_answer
from edgefleet.server.history import (
    TELEMETRY_SPAN,
    HeartbeatSlot,
    SlotKey,
    merge_heartbeat_slots,
    request_rates,
)
from edgefleet.server.mqtt.aggregate import TelemetryAggregate, health_of
from edgefleet.server.mqtt.buckets import BucketKey, store_buckets
from edgefleet.timefmt import parse_time

log = logging.getLogger(__name__)

_SHADOW_MARK = " runs in shadow beside "  # the agent's reason for a shadow install's COMMITTED
_REFUSED = "refused"  # the install_state of an agent's report of a refusal


@dataclass
class DeviceUpdate:
    """What one batch changes on one device."""

    online: bool | None = None
    online_reason: str = ""  # why `online` was set, for the presence change it may make
    online_at: dt.datetime | None = None  # when it was set
    connected: bool = False  # its presence said online: a new connection
    last_seen: dt.datetime | None = None
    heartbeat: Heartbeat | None = None  # set through `offer_heartbeat`
    heartbeat_sent_at: dt.datetime | None = None  # of `heartbeat`, parsed
    heartbeat_order: int = 0
    statuses: list[tuple[int, dt.datetime, StatusReport]] = field(default_factory=list)
    messages: int = 0  # the device's messages merged in

    def offer_heartbeat(self, heartbeat: Heartbeat, order: int) -> bool:
        """Keep `heartbeat` (arrived as the `order`th message) unless the one kept was sent later.

        Returns whether it was kept.

        Raises:
            MalformedDocumentError: `sent_at` is not a time (a `Heartbeat` never has one).
        """
        sent_at = parse_time(heartbeat.sent_at)
        if self.heartbeat_sent_at is not None and sent_at < self.heartbeat_sent_at:
            return False
        self.heartbeat = heartbeat
        self.heartbeat_sent_at = sent_at
        self.heartbeat_order = order
        return True


@dataclass(frozen=True)
class KeptMessage:
    """A signed device message as it arrived, kept until its batch is written."""

    device_id: str
    topic: str
    payload: bytes  # as the device signed it
    received_at: dt.datetime
    window_start: str | None = None  # a telemetry window's, its identity beside the device


@dataclass
class IngestBatch:
    """Everything accepted since the last flush."""

    devices: dict[str, DeviceUpdate] = field(default_factory=dict)
    telemetry: dict[BucketKey, TelemetryAggregate] = field(default_factory=dict)
    # (device, answer, received at), in arrival order
    diagnostics: list[tuple[str, DiagnosticsReport, dt.datetime]] = field(default_factory=list)
    heartbeat_slots: dict[SlotKey, HeartbeatSlot] = field(default_factory=dict)
    kept: list[KeptMessage] = field(default_factory=list)  # in arrival order
    messages: int = 0
    # called once the batch (and every one before it) is written: the link's acknowledgements
    on_stored: list[Callable[[], None]] = field(default_factory=list)

    def device_parts(self) -> list[IngestBatch]:
        """This batch cut into one batch per device, in device id order, without its
        `on_stored` callbacks. Every message adds to `devices`, so each part has one."""
        parts: dict[str, IngestBatch] = {}

        def part(device_id: str) -> IngestBatch:
            found = parts.get(device_id)
            if found is None:
                found = parts[device_id] = IngestBatch()
            return found

        for device_id, changes in self.devices.items():
            part(device_id).devices[device_id] = changes
            part(device_id).messages = changes.messages
        for key, aggregate in self.telemetry.items():
            part(key[0]).telemetry[key] = aggregate
        for answer in self.diagnostics:
            part(answer[0]).diagnostics.append(answer)
        for slot_key, slot in self.heartbeat_slots.items():
            part(slot_key[0]).heartbeat_slots[slot_key] = slot
        for message in self.kept:
            part(message.device_id).kept.append(message)
        return [parts[device_id] for device_id in sorted(parts)]

    def contents(self) -> dict[str, int]:
        """The messages the batch holds, by kind: status, heartbeat, telemetry (windows),
        diagnostics and presence (the rest); they add up to `messages`."""
        counts = {
            "status": sum(len(changes.statuses) for changes in self.devices.values()),
            "heartbeat": sum(slot.samples for slot in self.heartbeat_slots.values()),
            "telemetry": sum(aggregate.windows for aggregate in self.telemetry.values()),
            "diagnostics": len(self.diagnostics),
        }
        counts["presence"] = max(0, self.messages - sum(counts.values()))
        return counts


class BatchWriter:
    """Writes `IngestBatch`es; counts the status reports it drops as duplicates."""

    def __init__(
        self,
        *,
        is_sqlite: bool,
        status_reports_kept: int,
        max_clock_ahead: dt.timedelta,
        return_gap: dt.timedelta,
    ) -> None:
        self._is_sqlite = is_sqlite
        self._reports_kept = status_reports_kept
        self._max_clock_ahead = max_clock_ahead
        self._return_gap = return_gap
        self.duplicates = 0  # status reports at or below the stored sequence

    def write(self, session: Session, batch: IngestBatch) -> set[str]:
        """Apply `batch` in `session` (the caller's unit of work); returns the devices
        that came back (see the module docstring).

        Raises:
            sqlalchemy errors, which `Database.session` turns into StorageError; the
            batch is left unchanged, so the caller can retry it.
        """
        devices = self._lock_devices(session, sorted(batch.devices))
        returned: set[str] = set()
        reported: list[str] = []  # devices with new status reports, in id order
        for device_id, changes in batch.devices.items():
            device = devices.get(device_id)
            if device is not None:
                if self._comes_back(device, changes):
                    returned.add(device_id)
                if self._apply(session, device, changes):
                    reported.append(device_id)
        self._trim_reports(session, sorted(reported))
        telemetry = {key: agg for key, agg in batch.telemetry.items() if key[0] in devices}
        store_buckets(session, telemetry, lock=not self._is_sqlite)
        _judge_models(session, devices, batch, sorted({key[0] for key in telemetry}))
        for device_id, report, received_at in batch.diagnostics:
            if device_id not in devices or not record_answer(
                session, device_id, report, received_at
            ):
                log.info(
                    "diagnostics answer %d from %r matches no open request: dropped",
                    report.request_id,
                    device_id,
                )
        merge_heartbeat_slots(
            session,
            {key: slot for key, slot in batch.heartbeat_slots.items() if key[0] in devices},
            lock=not self._is_sqlite,
        )
        return returned

    def _comes_back(self, device: Device, update: DeviceUpdate) -> bool:
        """Whether `update` brings `device` back: online after offline, a new connection,
        or after silence."""
        if update.connected or (update.online and not device.online):
            return True
        return (
            update.last_seen is not None
            and device.last_seen is not None
            and update.last_seen - device.last_seen >= self._return_gap
        )

    def _lock_devices(self, session: Session, ids: list[str]) -> dict[str, Device]:
        devices: dict[str, Device] = {}
        for chunk in in_chunks(ids):
            query = select(Device).where(Device.id.in_(chunk)).order_by(Device.id)
            if not self._is_sqlite:
                # FOR NO KEY UPDATE: ingestion changes no key, so a rollout inserting a
                # member row (FOR KEY SHARE on its device, the foreign key) need not wait.
                query = query.with_for_update(key_share=True)
            devices.update((d.id, d) for d in session.scalars(query))
        return devices

    def _apply(self, session: Session, device: Device, update: DeviceUpdate) -> bool:
        if update.online is not None and update.online != device.online:
            device.online = update.online
            session.add(
                PresenceChange(
                    device_id=device.id,
                    at=update.online_at,
                    online=update.online,
                    reason=update.online_reason,
                )
            )
        if update.last_seen is not None and (
            device.last_seen is None or device.last_seen < update.last_seen
        ):
            device.last_seen = update.last_seen
        state_order = model_order = 0  # arrival order of what set them
        accepted = 0
        for order, received, report in sorted(update.statuses, key=lambda s: s[2].sequence):
            if report.sequence <= (device.status_sequence or 0):
                self.duplicates += 1
                continue
            device.status_sequence = report.sequence
            session.add(_status_row(device.id, received, report))
            accepted += 1
            if order > state_order and report.install_state != _REFUSED:
                state_order = order
                device.install_state = report.install_state
            if report.install_state == "committed" and _SHADOW_MARK not in (report.reason or ""):
                model_order = max(model_order, order)
                device.model_name = report.bundle_name
                device.model_version = report.bundle_version
                device.previous_version = report.previous_version
        heartbeat = update.heartbeat
        latest = None if update.last_seen is None else update.last_seen + self._max_clock_ahead
        if heartbeat is not None and not _sent_before(
            update.heartbeat_sent_at, device.heartbeat, latest
        ):
            device.heartbeat = heartbeat.model_dump(
                mode="json", exclude={"schema_version", "device_id"}
            )
            device.agent_version = heartbeat.agent_version
            if heartbeat.security_floors is not None:
                device.security_floors = dict(heartbeat.security_floors)
            if update.heartbeat_order > model_order:
                device.model_name = heartbeat.model_name
                device.model_version = heartbeat.model_version
            if update.heartbeat_order > state_order:
                device.install_state = heartbeat.install_state
        return accepted > 0

    def _trim_reports(self, session: Session, device_ids: list[str]) -> None:
        """Delete all but the newest `status_reports_kept` reports of each of `device_ids`:
        one statement per chunk of devices, not a query per device (the unit of work
        holds SQLite's one write lock, and PostgreSQL's device row locks, meanwhile)."""
        if not device_ids:
            return
        session.flush()
        for chunk in in_chunks(device_ids):
            ranked = (
                select(
                    StatusReportRow.id,
                    func.row_number()
                    .over(
                        partition_by=StatusReportRow.device_id,
                        order_by=(StatusReportRow.sequence.desc(), StatusReportRow.id.desc()),
                    )
                    .label("newer"),
                )
                .where(StatusReportRow.device_id.in_(chunk))
                .subquery()
            )
            old = select(ranked.c.id).where(ranked.c.newer > self._reports_kept)
            session.execute(delete(StatusReportRow).where(StatusReportRow.id.in_(old)))


def _judge_models(
    session: Session, devices: dict[str, Device], batch: IngestBatch, judged: list[str]
) -> None:
    """Set `Device.health` of the devices that sent telemetry in `batch` from their
    requests of the last hour (`TELEMETRY_SPAN` before the newest message the batch
    holds), the buckets just stored included: one bounded read a flush, not a message."""
    if not judged:
        return
    seen = [batch.devices[d].last_seen for d in judged if d in batch.devices]
    now = max((at for at in seen if at is not None), default=None)
    if now is None:
        return
    rates = request_rates(session, judged, now - TELEMETRY_SPAN)
    for device_id in judged:
        devices[device_id].health = health_of(*rates.get(device_id, (0, 0, 0))) or "unknown"


def _status_row(device_id: str, received: dt.datetime, report: StatusReport) -> StatusReportRow:
    return StatusReportRow(
        device_id=device_id,
        sequence=report.sequence,
        received_at=received,
        sent_at=parse_time(report.sent_at),
        install_state=report.install_state,
        bundle_name=report.bundle_name,
        bundle_version=report.bundle_version,
        directive_sequence=report.directive_sequence,
        reason=report.reason,
        frozen_reason=report.frozen_reason,
    )


def _sent_before(
    sent_at: dt.datetime | None, stored: dict[str, Any] | None, latest: dt.datetime | None
) -> bool:
    """Whether a heartbeat sent at `sent_at` is older than the `stored` one.

    A stored heartbeat without a readable `sent_at` (none yet, or written by an
    older server), or dated after `latest` (the latest time a device may date a
    message now), orders nothing: the new one is applied.
    """
    stored_at = stored.get("sent_at") if isinstance(stored, dict) else None
    if sent_at is None or not isinstance(stored_at, str):
        return False
    try:
        stored_sent_at = parse_time(stored_at)
    except MalformedDocumentError:
        return False
    return sent_at < stored_sent_at and (latest is None or stored_sent_at <= latest)


__all__ = ["BatchWriter", "BucketKey", "DeviceUpdate", "IngestBatch"]
