"""A device's history and its health verdict: heartbeats over time, presence changes,
and the one answer to "is this device all right, and if not, why".

Heartbeat history. Every heartbeat accepted is merged into a `HeartbeatSample`
row per device and 1-minute slot (by the time the server received it): sums,
maxima, minima and counts, so averages and extremes stay exact however slots
are merged. Retention (`downsample`) merges slots older than 24 h into
15-minute slots and slots older than 7 days into 1-hour slots; rows go after
`telemetry_retention`. Merging follows the telemetry buckets' rule: read the
rows locked (PostgreSQL), merge, write back or insert; when another replica
inserted the same slot first, the unit of work fails on the unique key and the
caller retries, merging into that row.

The verdict (`device_health_verdict`) is the one the CLI `devices health`, the
API and the pages show: a state (ok, degraded, failing, offline, unknown) and
the reasons in words. A device whose last heartbeat names no model in service is
`no-model`: it answers its local /v1/health "no-model" and refuses predictions, so it
is never ok.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session, object_session

from edgefleet.mqtt.messages import Heartbeat
from edgefleet.server.db.models import (
    Alert,
    Device,
    HeartbeatSample,
    PresenceChange,
    StatusReportRow,
    TelemetryBucket,
)
from edgefleet.server.db.rows import as_utc, in_chunks

SLOT_S = 60  # heartbeats are merged per minute
# (age, resolution): slots older than the age are merged into slots of that many seconds.
DOWNSAMPLING: tuple[tuple[dt.timedelta, int], ...] = (
    (dt.timedelta(hours=24), 15 * 60),
    (dt.timedelta(days=7), 60 * 60),
)
DOWNSAMPLE_ROWS_PER_STEP = 50_000  # per tier and retention step; the rest waits for the next
MAX_POINTS = 1500  # heartbeat points one history answer holds at most
# Coarser resolutions a history answer may choose, beyond the stored ones.
POINT_RESOLUTIONS_S = (SLOT_S, 5 * 60, 15 * 60, 60 * 60, 6 * 60 * 60, 24 * 60 * 60)

DISK_ALMOST_FULL = 0.05  # free share below which the disk is almost full
HOT_C = 85.0
RECENT = dt.timedelta(hours=24)  # an install that failed or was refused this recently counts
TELEMETRY_SPAN = dt.timedelta(hours=1)  # the rates the verdict quotes and Device.health judges
PROBLEM_INSTALL_STATES = ("failed", "refused")

VerdictState = Literal["ok", "degraded", "no-model", "failing", "offline", "unknown"]
_SEVERITY: dict[str, int] = {
    "ok": 0,
    "unknown": 1,
    "degraded": 2,
    "no-model": 3,
    "failing": 4,
    "offline": 5,
}
NO_MODEL = "no model installed: the device refuses every prediction until one is"

SlotKey = tuple[str, dt.datetime]  # device id, slot start (at SLOT_S resolution)


# -- heartbeat slots ---------------------------------------------------------------------------


@dataclass
class HeartbeatSlot:
    """Heartbeats merged over one slot: what one `HeartbeatSample` row holds."""

    samples: int = 0
    cpu_sum: float = 0.0
    cpu_max: float = 0.0
    memory_used_sum: float = 0.0
    memory_total: int = 0  # the latest merged in
    disk_free_min: int = 0
    disk_total: int = 0  # the latest merged in
    temperature_samples: int = 0
    temperature_sum: float = 0.0
    temperature_max: float | None = None

    def add(self, heartbeat: Heartbeat) -> None:
        """Merge one heartbeat in."""
        temperature = heartbeat.temperature_c
        self.merge(
            HeartbeatSlot(
                samples=1,
                cpu_sum=heartbeat.cpu_percent,
                cpu_max=heartbeat.cpu_percent,
                memory_used_sum=float(heartbeat.memory_used_bytes),
                memory_total=heartbeat.memory_total_bytes,
                disk_free_min=heartbeat.disk_free_bytes,
                disk_total=heartbeat.disk_total_bytes,
                temperature_samples=0 if temperature is None else 1,
                temperature_sum=temperature or 0.0,
                temperature_max=temperature,
            )
        )

    def merge(self, other: HeartbeatSlot) -> None:
        """Merge `other` (later data) in: sums and counts add, extremes compare."""
        if other.samples == 0:
            return
        first = self.samples == 0
        self.samples += other.samples
        self.cpu_sum += other.cpu_sum
        self.cpu_max = other.cpu_max if first else max(self.cpu_max, other.cpu_max)
        self.memory_used_sum += other.memory_used_sum
        self.memory_total = other.memory_total
        self.disk_free_min = (
            other.disk_free_min if first else min(self.disk_free_min, other.disk_free_min)
        )
        self.disk_total = other.disk_total
        self.temperature_samples += other.temperature_samples
        self.temperature_sum += other.temperature_sum
        if other.temperature_max is not None:
            self.temperature_max = (
                other.temperature_max
                if self.temperature_max is None
                else max(self.temperature_max, other.temperature_max)
            )

    def columns(self) -> dict[str, Any]:
        """The row's columns this slot holds."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def of_row(cls, row: Mapping[Any, Any]) -> HeartbeatSlot:
        """The slot a stored row (a Core row's mapping) holds."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def slot_start(at: dt.datetime, resolution_s: int) -> dt.datetime:
    """The start of the slot of `resolution_s` seconds (aligned to the epoch, UTC) `at` is in."""
    seconds = int(at.timestamp())
    return dt.datetime.fromtimestamp(seconds - seconds % resolution_s, dt.timezone.utc)


def merge_heartbeat_slots(
    session: Session,
    slots: Mapping[SlotKey, HeartbeatSlot],
    *,
    resolution_s: int = SLOT_S,
    lock: bool,
) -> None:
    """Merge `slots` into the stored rows of `resolution_s` (locked when `lock`), or insert.

    `slots` is only read, so a failed unit of work can be retried with it as it is.

    Raises:
        sqlalchemy errors (a unique violation when another replica inserted a slot
        first: retry), which `Database.session` turns into StorageError.
    """
    if not slots:
        return
    table = cast(Table, HeartbeatSample.__table__)
    starts = sorted({key[1] for key in slots})
    existing: dict[SlotKey, Any] = {}
    for chunk in in_chunks(sorted({key[0] for key in slots})):
        query = (
            select(table)
            .where(table.c.device_id.in_(chunk))
            .where(table.c.resolution_s == resolution_s)
            .where(table.c.slot_start.in_(starts))
            .order_by(table.c.id)
        )
        if lock:
            query = query.with_for_update()
        for found in session.execute(query):
            existing[(found.device_id, as_utc(found.slot_start))] = found
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for key, slot in sorted(slots.items(), key=lambda item: item[0]):
        stored = existing.get(key)
        if stored is None:
            values = slot.columns()
            values.update(device_id=key[0], slot_start=key[1], resolution_s=resolution_s)
            inserts.append(values)
        else:
            merged = HeartbeatSlot.of_row(stored._mapping)
            merged.merge(slot)
            values = merged.columns()
            values["sample_id"] = stored.id
            updates.append(values)
    if updates:
        session.execute(update(table).where(table.c.id == bindparam("sample_id")), updates)
    if inserts:
        session.execute(insert(table), inserts)


def downsample(session: Session, now: dt.datetime, *, lock: bool) -> int:
    """Merge slots past each `DOWNSAMPLING` age into coarser ones; return rows merged away.

    A coarse slot is filled once all of it is past the age, so finer and coarser
    rows never share one. The fine rows are read locked (`lock`, PostgreSQL), so
    two replicas running retention at once cannot both merge the same rows.

    Raises:
        sqlalchemy errors, which `Database.session` turns into StorageError.
    """
    table = cast(Table, HeartbeatSample.__table__)
    merged_away = 0
    for age, resolution_s in DOWNSAMPLING:
        cutoff = slot_start(now - age, resolution_s)
        query = (
            select(table)
            .where(table.c.resolution_s < resolution_s)
            .where(table.c.slot_start < cutoff)
            .order_by(table.c.slot_start, table.c.id)
            .limit(DOWNSAMPLE_ROWS_PER_STEP)
        )
        if lock:
            query = query.with_for_update()
        rows = list(session.execute(query))
        if not rows:
            continue
        coarse: dict[SlotKey, HeartbeatSlot] = {}
        for row in rows:
            key = (row.device_id, slot_start(row.slot_start, resolution_s))
            coarse.setdefault(key, HeartbeatSlot()).merge(HeartbeatSlot.of_row(row._mapping))
        for chunk in in_chunks(row.id for row in rows):
            session.execute(delete(table).where(table.c.id.in_(chunk)))
        merge_heartbeat_slots(session, coarse, resolution_s=resolution_s, lock=lock)
        merged_away += len(rows)
    return merged_away


# -- reading history ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatPoint:
    """A device's heartbeats over `resolution_s` seconds from `at`."""

    at: dt.datetime
    resolution_s: int
    samples: int
    cpu_avg: float
    cpu_max: float
    memory_used_avg: float
    memory_total: int
    disk_free_min: int
    disk_total: int
    temperature_avg: float | None
    temperature_max: float | None

    @classmethod
    def of_slot(cls, at: dt.datetime, resolution_s: int, slot: HeartbeatSlot) -> HeartbeatPoint:
        return cls(
            at=at,
            resolution_s=resolution_s,
            samples=slot.samples,
            cpu_avg=slot.cpu_sum / slot.samples,
            cpu_max=slot.cpu_max,
            memory_used_avg=slot.memory_used_sum / slot.samples,
            memory_total=slot.memory_total,
            disk_free_min=slot.disk_free_min,
            disk_total=slot.disk_total,
            temperature_avg=(
                slot.temperature_sum / slot.temperature_samples
                if slot.temperature_samples
                else None
            ),
            temperature_max=slot.temperature_max,
        )


def point_resolution(since: dt.datetime, until: dt.datetime) -> int:
    """The finest of `POINT_RESOLUTIONS_S` that spans since..until in at most `MAX_POINTS`."""
    span = (until - since).total_seconds()
    for resolution_s in POINT_RESOLUTIONS_S:
        if span / resolution_s <= MAX_POINTS - 1:
            return resolution_s
    return POINT_RESOLUTIONS_S[-1]


def heartbeat_series(
    session: Session, device_id: str, since: dt.datetime, until: dt.datetime
) -> list[HeartbeatPoint]:
    """The device's heartbeats from `since` to `until`, oldest first, in at most
    about `MAX_POINTS` points: each point spans the resolution `point_resolution`
    picks, or its stored slot's when that is coarser (older history)."""
    wanted = point_resolution(since, until)
    table = cast(Table, HeartbeatSample.__table__)
    rows = session.execute(
        select(table)
        .where(table.c.device_id == device_id)
        .where(table.c.slot_start >= slot_start(since, wanted))
        .where(table.c.slot_start < until)
        .order_by(table.c.slot_start, table.c.id)
    )
    points: dict[dt.datetime, tuple[int, HeartbeatSlot]] = {}
    for row in rows:
        resolution_s = max(wanted, row.resolution_s)
        at = slot_start(row.slot_start, resolution_s)
        known = points.get(at)
        slot = HeartbeatSlot.of_row(row._mapping)
        if known is None:
            points[at] = (resolution_s, slot)
        else:
            known[1].merge(slot)
            points[at] = (max(known[0], resolution_s), known[1])
    return [HeartbeatPoint.of_slot(at, res, slot) for at, (res, slot) in sorted(points.items())]


def presence_history(session: Session, device_id: str, since: dt.datetime) -> list[PresenceChange]:
    """The device's changes between online and offline from `since` on, oldest first."""
    return list(
        session.scalars(
            select(PresenceChange)
            .where(PresenceChange.device_id == device_id, PresenceChange.at >= since)
            .order_by(PresenceChange.at, PresenceChange.id)
        )
    )


# -- the verdict -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthVerdict:
    """Whether a device is all right, and if not, why (the reasons, in words)."""

    state: VerdictState
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VerdictFacts:
    """What the verdict reads beyond the device's row (`verdict_facts` loads it)."""

    open_alerts: tuple[str, ...] = ()  # "feature-drift (pixels[53])", ...
    install_problem: str | None = None  # the newest status report, when it failed or refused
    requests: int = 0  # over TELEMETRY_SPAN
    errors: int = 0
    fallbacks: int = 0


def device_health_verdict(
    device: Device, now: dt.datetime, facts: VerdictFacts | None = None
) -> HealthVerdict:
    """The device's verdict at `now`. Without `facts`, they are loaded through the
    session the device belongs to (a device of no session: its row alone)."""
    if facts is None:
        session = object_session(device)
        facts = (
            verdict_facts(session, [device.id], now).get(device.id, VerdictFacts())
            if session is not None
            else VerdictFacts()
        )
    found: list[tuple[str, str]] = []  # (state, reason)
    beat = device.heartbeat or {}
    if not device.online:
        if device.last_seen is None:
            found.append(("unknown", "never connected"))
        else:
            found.append(
                ("offline", f"offline, last seen {describe_age(now - device.last_seen)} ago")
            )
    elif not beat:
        found.append(("unknown", "no heartbeat received yet"))
    if beat and not (device.model_name and device.model_version):
        found.append(("no-model", NO_MODEL))
    if device.health in ("failing", "degraded"):
        found.append((device.health, _model_health(device.health, facts)))
    if beat.get("frozen_out"):
        why = beat.get("frozen_reason") or "its newest fleet timestamp expired"
        found.append(("degraded", f"frozen out: {why}"))
    for breaker in beat.get("breakers") or []:
        if breaker.get("state") in ("open", "half-open"):
            found.append(
                ("degraded", f"breaker {breaker['state']} on fallback step {breaker.get('step')}")
            )
    total, free = beat.get("disk_total_bytes") or 0, beat.get("disk_free_bytes") or 0
    if total and free / total < DISK_ALMOST_FULL:
        found.append(("degraded", f"disk almost full: {100 * free / total:.1f}% free"))
    temperature = beat.get("temperature_c")
    if isinstance(temperature, (int, float)) and temperature >= HOT_C:
        found.append(("degraded", f"hot: {temperature:.1f} °C (limit {HOT_C:.0f} °C)"))
    if facts.install_problem:
        found.append(("degraded", facts.install_problem))
    if facts.open_alerts:
        count = len(facts.open_alerts)
        found.append(
            (
                "degraded",
                f"{count} open alert{'s' if count > 1 else ''}: " + ", ".join(facts.open_alerts),
            )
        )
    state = max((s for s, _ in found), key=_SEVERITY.__getitem__, default="ok")
    return HealthVerdict(cast(VerdictState, state), [reason for _, reason in found])


def health_verdicts(
    session: Session, devices: Sequence[Device], now: dt.datetime
) -> dict[str, HealthVerdict]:
    """`device_health_verdict` for each of `devices`, their facts loaded in bulk."""
    facts = verdict_facts(session, [d.id for d in devices], now)
    return {d.id: device_health_verdict(d, now, facts.get(d.id, VerdictFacts())) for d in devices}


def verdict_facts(
    session: Session, device_ids: Sequence[str], now: dt.datetime
) -> dict[str, VerdictFacts]:
    """Open alerts, a recent failed or refused install, and the last hour's request
    rates, per device (devices with none of them are left out)."""
    alerts: dict[str, list[str]] = {}
    problems: dict[str, str] = {}
    rates: dict[str, tuple[int, int, int]] = {}
    for chunk in in_chunks(device_ids):
        for alert in session.scalars(
            select(Alert)
            .where(Alert.device_id.in_(chunk), Alert.resolved_at.is_(None))
            .order_by(Alert.id)
        ):
            label = alert.kind + (f" ({alert.feature})" if alert.feature else "")
            alerts.setdefault(cast(str, alert.device_id), []).append(label)
        newest: dict[str, StatusReportRow] = {}
        for report in session.scalars(
            select(StatusReportRow)
            .where(
                StatusReportRow.device_id.in_(chunk),
                StatusReportRow.received_at >= now - RECENT,
            )
            .order_by(StatusReportRow.sequence)
        ):
            newest[report.device_id] = report
        for device_id, report in newest.items():
            if report.install_state in PROBLEM_INSTALL_STATES:
                problems[device_id] = _install_problem(report, now)
        rates.update(request_rates(session, chunk, now - TELEMETRY_SPAN))
    return {
        device_id: VerdictFacts(
            open_alerts=tuple(alerts.get(device_id, ())),
            install_problem=problems.get(device_id),
            requests=rates.get(device_id, (0, 0, 0))[0],
            errors=rates.get(device_id, (0, 0, 0))[1],
            fallbacks=rates.get(device_id, (0, 0, 0))[2],
        )
        for device_id in {*alerts, *problems, *rates}
    }


def request_rates(
    session: Session, device_ids: Sequence[str], since: dt.datetime
) -> dict[str, tuple[int, int, int]]:
    """(requests, errors, fallbacks) per device over its telemetry buckets that start at
    `since` or later, every bundle version (devices with no such bucket are left out).
    A bounded read: an hour is 12 buckets a device and version, found by the index on
    (device, bucket start)."""
    rates: dict[str, tuple[int, int, int]] = {}
    for chunk in in_chunks(device_ids):
        for device_id, requests, errors, fallbacks in session.execute(
            select(
                TelemetryBucket.device_id,
                func.sum(TelemetryBucket.requests),
                func.sum(TelemetryBucket.errors),
                func.sum(TelemetryBucket.fallbacks),
            )
            .where(TelemetryBucket.device_id.in_(chunk), TelemetryBucket.bucket_start >= since)
            .group_by(TelemetryBucket.device_id)
        ):
            rates[device_id] = (int(requests or 0), int(errors or 0), int(fallbacks or 0))
    return rates


def describe_age(age: dt.timedelta) -> str:
    """A duration in words, to the minute: "45 s", "3 min", "2 h 5 min", "3 d 4 h"."""
    seconds = max(0, int(age.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60 % 60, seconds // 3600 % 24, seconds // 86400
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def _model_health(health: str, facts: VerdictFacts) -> str:
    if not facts.requests:
        return f"model {health} in the hour before its last telemetry window"
    return (
        f"model {health}: {100 * facts.errors / facts.requests:.0f}% errors, "
        f"{100 * facts.fallbacks / facts.requests:.0f}% fallbacks over the last hour "
        f"({facts.requests} requests)"
    )


def _install_problem(report: StatusReportRow, now: dt.datetime) -> str:
    what = (
        f"{report.bundle_name}@{report.bundle_version}"
        if report.bundle_name and report.bundle_version
        else "a bundle"
    )
    verb = "was refused" if report.install_state == "refused" else "failed"
    reason = f": {report.reason}" if report.reason else ""
    return f"install of {what} {verb} {describe_age(now - report.received_at)} ago{reason}"


__all__ = [
    "DOWNSAMPLING",
    "MAX_POINTS",
    "SLOT_S",
    "HealthVerdict",
    "HeartbeatPoint",
    "HeartbeatSlot",
    "VerdictFacts",
    "describe_age",
    "device_health_verdict",
    "downsample",
    "health_verdicts",
    "heartbeat_series",
    "merge_heartbeat_slots",
    "point_resolution",
    "presence_history",
    "slot_start",
    "verdict_facts",
]
