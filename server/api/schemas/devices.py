"""Devices: one device as the inventory shows it (with its health verdict), the
inventory's pages, one device in detail with its recent status reports and
telemetry, and its history: heartbeats over time and presence changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, field_validator

from edgefleet.server.api.schemas.base import RowView


class LinkSummary(BaseModel):
    """The agent's MQTT link counters, as its last heartbeat reported them."""

    connects: int
    disconnects: int
    publish_failures: int
    outbox_depth: int
    last_problem: str | None = None


class BreakerSummary(BaseModel):
    """One step of the device's fallback chain and its breaker's state."""

    step: str
    state: str  # closed | open | half-open


class HeartbeatSummary(BaseModel):
    """The health figures of a device's last heartbeat; what the agent reports of
    itself is None when its agent predates it."""

    sent_at: str | None = None
    uptime_s: int | None = None
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    temperature_c: float | None = None
    link: LinkSummary | None = None
    breakers: list[BreakerSummary] | None = None
    trust_root_version: int | None = None
    frozen_out: bool | None = None
    frozen_reason: str | None = None


class VerdictPublic(BaseModel):
    """Whether the device is all right, and if not, why (`edgefleet.server.history`)."""

    state: Literal["ok", "degraded", "no-model", "failing", "offline", "unknown"]
    reasons: list[str]


class DevicePublic(RowView):
    """A device as the API shows it: inventory, what it serves, its health."""

    id: str
    online: bool
    model_name: str | None
    model_version: str | None
    previous_version: str | None
    install_state: str | None
    health: str
    last_seen: dt.datetime | None
    profile: str
    arch: str
    runtimes: list[str]
    agent_version: str
    tags: dict[str, str]
    enrolled_at: dt.datetime
    heartbeat: HeartbeatSummary | None
    # Per model name, the lowest release counter the device runs; None: not reported
    # (an agent that predates floors per name).
    security_floors: dict[str, int] | None
    # Filled in by the routes (from the row and the device's alerts, reports, telemetry).
    verdict: VerdictPublic | None = None

    @field_validator("heartbeat", mode="before")
    @classmethod
    def _usable_heartbeat(cls, stored: Any) -> HeartbeatSummary | None:
        """The stored heartbeat's figures; None when there is none or it is unusable
        (it is kept as the device sent it)."""
        if not isinstance(stored, Mapping):
            return None
        try:
            return HeartbeatSummary.model_validate(stored)
        except ValidationError:
            return None


class DeviceList(BaseModel):
    items: list[DevicePublic]
    total: int


class StatusReportPublic(RowView):
    """One stored status report of a device."""

    sequence: int
    received_at: dt.datetime
    sent_at: dt.datetime
    install_state: str
    bundle_name: str | None
    bundle_version: str | None
    directive_sequence: int | None
    reason: str | None
    frozen_reason: str | None = None  # set while the device may be frozen out


class TelemetrySummary(BaseModel):
    """One bundle version's telemetry of the device over `since`..now."""

    bundle_name: str
    bundle_version: str
    since: dt.datetime
    windows: int
    requests: int
    errors: int
    fallbacks: int
    schema_violations: int
    error_rate: float | None
    fallback_rate: float | None


class DeviceDetail(DevicePublic):
    status_reports: list[StatusReportPublic]
    telemetry: list[TelemetrySummary]


class HeartbeatPointPublic(BaseModel):
    """A device's heartbeats merged over `resolution_s` seconds from `at`."""

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


class PresenceChangePublic(RowView):
    """The device went online or offline, and why."""

    at: dt.datetime
    online: bool
    reason: str


class DeviceHistory(BaseModel):
    """A device's heartbeats (at most about 1500 points) and presence changes over
    `since`..`until`, oldest first."""

    device_id: str
    since: dt.datetime
    until: dt.datetime
    resolution_s: int  # of the points, unless a stored slot is coarser (older history)
    points: list[HeartbeatPointPublic]
    presence: list[PresenceChangePublic]


__all__ = [
    "BreakerSummary",
    "DeviceDetail",
    "DeviceHistory",
    "DeviceList",
    "DevicePublic",
    "HeartbeatPointPublic",
    "HeartbeatSummary",
    "LinkSummary",
    "PresenceChangePublic",
    "StatusReportPublic",
    "TelemetrySummary",
    "VerdictPublic",
]
