"""Deliveries as people see them: pending, delivered or failed; counted; sent again.

A delivery is pending while it is undelivered and has attempts left, failed
(given up) once `webhook_max_attempts` attempts failed, delivered after a 2xx.
A failed delivery stays until an operator retries it: that gives it a full set
of attempts again, and it is sent at the next tick (audited "webhook.retry").
"""

from __future__ import annotations

import builtins
import datetime as dt
from typing import Literal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import WebhookDelivery
from edgefleet.server.errors import ConflictError, NotFoundError
from edgefleet.server.principals import Principal

DeliveryState = Literal["pending", "delivered", "failed"]


def delivery_state(delivery: WebhookDelivery, max_attempts: int) -> DeliveryState:
    if delivery.delivered_at is not None:
        return "delivered"
    return "failed" if delivery.attempts >= max_attempts else "pending"


def _undelivered() -> ColumnElement[bool]:
    return WebhookDelivery.delivered_at.is_(None)


def _given_up(max_attempts: int) -> ColumnElement[bool]:
    return _undelivered() & (WebhookDelivery.attempts >= max_attempts)


def list_deliveries(
    session: Session, max_attempts: int, *, failed_only: bool = False, limit: int = 100
) -> builtins.list[WebhookDelivery]:
    """Undelivered deliveries (only the given-up ones with `failed_only`), oldest first."""
    condition = _given_up(max_attempts) if failed_only else _undelivered()
    query = select(WebhookDelivery).where(condition).order_by(WebhookDelivery.id).limit(limit)
    return list(session.scalars(query))


def delivery_counts(session: Session, max_attempts: int) -> tuple[int, int]:
    """(pending, failed): deliveries still to be tried, and given-up ones."""
    undelivered = session.scalar(select(func.count()).where(_undelivered())) or 0
    failed = session.scalar(select(func.count()).where(_given_up(max_attempts))) or 0
    return int(undelivered) - int(failed), int(failed)


def retry_delivery(
    session: Session, delivery_id: int, actor: Principal, now: dt.datetime
) -> WebhookDelivery:
    """Send delivery `delivery_id` again at the next tick, with a full set of attempts.

    Raises:
        NotFoundError: no such delivery.
        ConflictError: it was delivered already.
    """
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise NotFoundError(
            f"no webhook delivery {delivery_id}: `edgefleet webhooks deliveries` lists them"
        )
    if delivery.delivered_at is not None:
        raise ConflictError(f"webhook delivery {delivery_id} was delivered already")
    previous = delivery.attempts
    delivery.attempts = 0
    delivery.next_attempt_at = now
    record_audit(
        session,
        actor,
        "webhook.retry",
        f"webhook delivery {delivery_id}",
        {"event": delivery.event, "alert_id": delivery.alert_id, "attempts": previous},
        now=now,
    )
    return delivery


__all__ = [
    "DeliveryState",
    "delivery_counts",
    "delivery_state",
    "list_deliveries",
    "retry_delivery",
]
