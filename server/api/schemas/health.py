"""Health: whether the server is up, its database reachable and its MQTT link connected."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class MqttLinkHealth(BaseModel):
    state: Literal["connected", "disconnected"]
    since: str  # when it became so (for "disconnected": when the link was last seen up)
    connects: int
    losses: int
    broker_restarts: int | None  # of the embedded broker; None with an external broker


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    mqtt: MqttLinkHealth | None  # None: no MQTT link in this process
    reason: str | None  # why degraded


__all__ = ["Health", "MqttLinkHealth"]
