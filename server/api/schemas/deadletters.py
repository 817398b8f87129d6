"""Dead letters as the API shows them: what the database refused of one device, and its replay."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from edgefleet.server.api.schemas.base import RowView


class DeadLetterPublic(RowView):
    id: int
    device_id: str
    at: dt.datetime = Field(description="when ingestion set the messages aside")
    error: str = Field(description="the database's error, one line")
    dropped: dict[str, int] = Field(
        description="messages by kind: status, heartbeat, telemetry, diagnostics, presence "
        "(presence is counted, not kept)"
    )


class KeptMessagePublic(BaseModel):
    topic: str
    received_at: str
    message: str | None = Field(
        description="the message as the device sent it, its signature left out (null: not text)"
    )


class DeadLetterDetail(DeadLetterPublic):
    messages: list[KeptMessagePublic]


class ReplayPublic(BaseModel):
    outcomes: dict[str, int] = Field(
        description='what became of each message: "taken" (written, or waiting with the '
        'rest while the database takes no writes), "duplicate", or why it was refused'
    )
    settled: bool = Field(
        description="the messages were written or set aside again, and the dead letter "
        "deleted; false: they wait for the database, and it is deleted once they are written"
    )
    again: int | None = Field(
        description="set aside again: the id of the new dead letter that keeps them"
    )


__all__ = ["DeadLetterDetail", "DeadLetterPublic", "KeptMessagePublic", "ReplayPublic"]
