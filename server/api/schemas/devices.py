"""Devices: one device as the inventory shows it, the inventory's pages, and one
device in detail with its recent status reports and telemetry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError, field_validator

from edgefleet.server.api.schemas.base import RowView


class HeartbeatSummary(BaseModel):
    """The health figures of a device's last heartbeat."""

    sent_at: str | None = None
    uptime_s: int | None = None
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    temperature_c: float | None = None


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


__all__ = [
    "DeviceDetail",
    "DeviceList",
    "DevicePublic",
    "HeartbeatSummary",
    "StatusReportPublic",
    "TelemetrySummary",
]
