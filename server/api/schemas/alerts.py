"""Drift alerts as the API shows them."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import Field

from edgefleet.server.api.schemas.base import RowView


class AlertPublic(RowView):
    id: int
    kind: str = Field(description="feature-drift, prediction-drift or dataset-drift")
    scope: Literal["device", "cohort"]
    device_id: str | None = Field(description="the device; null for a cohort alert")
    cohort: str | None = Field(
        description='the cohort: "version" (every device on the bundle version), '
        '"tag:KEY=VALUE", "profile:PROFILE" or "stage:ROLLOUT_ID/STAGE_INDEX" (the devices '
        "of a stage of an active rollout); null for a device alert"
    )
    bundle_name: str
    bundle_version: str
    feature: str | None = Field(description="the feature; null for dataset drift")
    opened_at: dt.datetime
    resolved_at: dt.datetime | None
    acknowledged_by: str | None
    acknowledged_at: dt.datetime | None
    evidence: dict[str, Any] = Field(
        description="statistic, threshold, samples, psi, js, window_start, window_end; "
        "resolved_by: the window that resolved it"
    )


__all__ = ["AlertPublic"]
