"""Rollouts: starting one, acting on one, the list, and one rollout's status."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from edgefleet.server.api.schemas.base import PRINTABLE, Reason, RequestBody, RowView


class RolloutCreate(RequestBody):
    bundle: str = Field(
        max_length=200,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="name@version",
        examples=["demo@1.2.3"],
    )
    select: str = Field(
        default="", max_length=2000, pattern=PRINTABLE, description="tag=value,... (empty: all)"
    )
    plan: dict[str, Any] = Field(
        description="Stages and gates (docs/rollouts.md)",
        examples=[{"stages": [{"percent": 34}, {"percent": 100}]}],
    )


class RolloutAction(RequestBody):
    reason: Reason | None = None


# Mapped from a `Rollout` row: `RolloutSummary.model_validate(row, context=labels)`,
# where `labels` is `bundle_labels` (name@version per bundle id).
class RolloutSummary(RowView):
    id: int
    bundle: str = Field(validation_alias="bundle_id")
    state: str
    stage_index: int
    stage_count: int = Field(validation_alias="plan")
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    reason: str | None

    @field_validator("bundle", mode="before")
    @classmethod
    def _bundle_label(cls, bundle_id: int, info: ValidationInfo) -> str:
        # "?" for a bundle the labels lack (the foreign key keeps that from happening)
        labels: Mapping[int, str] = info.context or {}
        return labels.get(bundle_id, "?")

    @field_validator("stage_count", mode="before")
    @classmethod
    def _count_stages(cls, plan: Mapping[str, Any]) -> int:
        return len(plan.get("stages", []))


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class GateCheckPublic(_Public):
    name: str
    passed: bool | None  # None: not (yet) judged
    detail: str


class StageStatus(_Public):
    index: int
    name: str
    shadow: bool
    assigned: int  # the stage's devices, skipped ones not included
    # Devices per state (pending, notified, ..., rolled_back, skipped: left out because
    # they take part in another active rollout).
    states: dict[str, int]
    # Of the succeeded devices, those whose install committed unchecked: no live
    # request judged the new version on the device (no traffic, no predictor).
    unchecked: int = 0
    # The gate verdict: only for the current stage of a running or paused rollout.
    decision: str | None = None
    reasons: list[str] = []
    checks: list[GateCheckPublic] = []
    # How old the telemetry the verdict judged is, in seconds: 0 when read for this
    # status; a large stage's reading is kept a few seconds (docs/rollouts.md, "Decisions").
    telemetry_age_s: float | None = None


class TransitionPublic(_Public):
    at: dt.datetime
    from_state: str
    to_state: str
    stage_index: int
    actor: str
    reason: str


class RolloutStatus(_Public):
    id: int
    bundle: str  # name@version
    state: str
    stage_index: int
    stage_count: int
    stage_started_at: dt.datetime | None
    selector: dict[str, str]
    devices: dict[str, int]  # per state, over every stage (skipped included)
    stages: list[StageStatus]
    transitions: list[TransitionPublic]
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    reason: str | None


__all__ = [
    "GateCheckPublic",
    "RolloutAction",
    "RolloutCreate",
    "RolloutStatus",
    "RolloutSummary",
    "StageStatus",
    "TransitionPublic",
]
