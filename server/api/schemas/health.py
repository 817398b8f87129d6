"""Health: whether the server is up, its database reachable and its MQTT link connected,
and what ingestion dropped because the database refused it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class MqttLinkHealth(BaseModel):
    state: Literal["connected", "disconnected"]
    since: str  # when it became so (for "disconnected": when the link was last seen up)
    connects: int
    losses: int
    broker_restarts: int | None  # of the embedded broker; None with an external broker


class DeadLetterHealth(BaseModel):
    device_id: str
    at: str  # when ingestion dropped them
    dropped: dict[str, int]  # messages by kind: status, heartbeat, telemetry, diagnostics, presence
    error: str  # the database's error, one line
    kept_id: int | None  # the dead letter that keeps them (GET /dead-letters/{id}); None: lost


class IngestionHealth(BaseModel):
    dead_lettered: int  # messages dropped since the server started: the database refused them
    last_dead_letter: DeadLetterHealth | None  # the last device whose messages were dropped


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    mqtt: MqttLinkHealth | None  # None: no MQTT link in this process
    ingestion: IngestionHealth | None  # None: no MQTT ingestion in this process
    reason: str | None  # why degraded


__all__ = ["DeadLetterHealth", "Health", "IngestionHealth", "MqttLinkHealth"]
