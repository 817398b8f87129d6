"""GET /webhooks/deliveries (viewer): alert events not delivered yet, or given up;
POST /webhooks/deliveries/{id}/retry (operator, audited): send a given-up one again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.webhooks import WebhookDeliveryPublic
from edgefleet.server.db.models import WebhookDelivery
from edgefleet.server.webhooks.deliveries import delivery_state, list_deliveries, retry_delivery
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/webhooks", tags=["webhooks"])

DeliveryId = Annotated[int, Path(ge=1, le=MAX_ID)]


def _public(delivery: WebhookDelivery, max_attempts: int) -> WebhookDeliveryPublic:
    state = delivery_state(delivery, max_attempts)
    return WebhookDeliveryPublic(
        id=delivery.id,
        alert_id=delivery.alert_id,
        event=delivery.event,
        state=state,
        attempts=delivery.attempts,
        max_attempts=max_attempts,
        created_at=delivery.created_at,
        next_attempt_at=delivery.next_attempt_at if state == "pending" else None,
        delivered_at=delivery.delivered_at,
        last_status=delivery.last_status,
        last_error=delivery.last_error,
    )


@router.get(
    "/deliveries",
    response_model=list[WebhookDeliveryPublic],
    summary="Alert events not delivered to the webhook yet (pending or failed), oldest first",
    responses=errors(),
)
def get_deliveries(
    session: SessionDep,
    context: ContextDep,
    _viewer: ViewerDep,
    failed: Annotated[
        bool, Query(description="only deliveries given up after every attempt failed")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[WebhookDeliveryPublic]:
    max_attempts = context.settings.webhook_max_attempts
    rows = list_deliveries(session, max_attempts, failed_only=failed, limit=limit)
    return [_public(row, max_attempts) for row in rows]


@router.post(
    "/deliveries/{delivery_id}/retry",
    response_model=WebhookDeliveryPublic,
    summary="Send an undelivered event again at once, with a full set of attempts",
    responses=errors(404, 409),
)
def retry(
    delivery_id: DeliveryId, session: SessionDep, context: ContextDep, operator: OperatorDep
) -> WebhookDeliveryPublic:
    delivery = retry_delivery(session, delivery_id, operator, context.clock())
    return _public(delivery, context.settings.webhook_max_attempts)
