"""A device's uploaded raw inputs as the API shows them (the file itself: its own route)."""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from edgefleet.server.api.schemas.base import RowView


class SamplePublic(RowView):
    id: int
    device_id: str
    bundle_name: str
    bundle_version: str
    reason: str = Field(description="the device's drift verdict when it began keeping them")
    samples: int
    size_bytes: int
    sha256: str = Field(description="of the .npz file")
    captured_at: dt.datetime = Field(description="when the device began keeping them")
    received_at: dt.datetime


__all__ = ["SamplePublic"]
