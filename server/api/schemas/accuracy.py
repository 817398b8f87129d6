"""Labelled accuracy as the API shows it."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field


class LabelledFigures(BaseModel):
    """Labelled feedback of one device, or of every device on the version (`device_id` null)."""

    device_id: str | None = Field(
        description="the device; null for every device of the cohort asked for"
    )
    labelled: int = Field(description="answers labelled through the agents' /v1/feedback")
    correct: int = Field(description="class labels that matched the answer")
    accuracy: float | None = Field(description="correct / labelled (classifiers), a share 0..1")
    mae: float | None = Field(description="mean absolute error (regression feedback)")
    rmse: float | None = Field(description="root mean squared error (regression feedback)")


class AccuracyPublic(BaseModel):
    bundle_name: str
    bundle_version: str
    cohort: str | None = Field(
        description='"version" (every device on it), "tag:KEY=VALUE" or "profile:PROFILE"; '
        "null when one device was asked for"
    )
    start: dt.datetime
    end: dt.datetime
    reference_metric: Literal["accuracy", "rmse"] | None = Field(
        description="the converter's figure for the shipped model; null without a report"
    )
    reference: float | None = Field(description="accuracy as a share 0..1, or rmse")
    subjects: list[LabelledFigures] = Field(
        description="the cohort first (device_id null), then each of its devices with labels"
    )


__all__ = ["AccuracyPublic", "LabelledFigures"]
