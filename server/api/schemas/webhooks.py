"""Webhook deliveries (alert events sent to the server's webhook) as the API shows them."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field


class WebhookDeliveryPublic(BaseModel):
    id: int = Field(description="sent as X-Edgefleet-Delivery")
    alert_id: int | None = Field(description="the alert; null once the alert was deleted")
    event: str = Field(description="alert.opened, alert.resolved or alert.acknowledged")
    state: Literal["pending", "delivered", "failed"] = Field(
        description="failed: every attempt failed; POST .../retry sends it again"
    )
    attempts: int
    max_attempts: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None = Field(description="null unless pending")
    delivered_at: dt.datetime | None
    last_status: int | None = Field(description="the HTTP status of the last attempt")
    last_error: str | None = Field(description="what went wrong in the last attempt")


__all__ = ["WebhookDeliveryPublic"]
