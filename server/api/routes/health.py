"""GET /health (no token: for load balancers) and GET /metrics (Prometheus, at the root)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from edgefleet.server.api.deps import ContextDep
from edgefleet.server.api.schemas.health import (
    DeadLetterHealth,
    Health,
    IngestionHealth,
    MqttLinkHealth,
)
from edgefleet.server.context import BrokerView, Ingestion
from edgefleet.server.errors import StorageError
from edgefleet.server.mqtt.link import LinkStatus
from edgefleet.timefmt import format_time
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=Health,
    summary="Is the server up, its database reachable and its MQTT link connected",
    responses={
        503: {
            "model": Health,
            "description": "degraded: the database does not answer, or the MQTT link has "
            "been down longer than mqtt_down_grace_s",
        }
    },
)
def health(context: ContextDep) -> JSONResponse:
    reasons: list[str] = []
    database: Literal["ok", "unreachable"] = "ok"
    try:
        with context.db.session() as session:
            session.execute(text("SELECT 1"))
    except StorageError:
        database = "unreachable"
        reasons.append("the database does not answer")
    mqtt: MqttLinkHealth | None = None
    if context.link is not None:
        link = context.link.status()
        mqtt = _link_health(link, context.broker)
        down_s = context.clock().timestamp() - link.since
        if not link.connected and down_s > context.settings.mqtt_down_grace_s:
            reasons.append(f"the MQTT link has been down since {mqtt.since}")
    answer = Health(
        status="degraded" if reasons else "ok",
        database=database,
        mqtt=mqtt,
        ingestion=None if context.ingest is None else _ingestion_health(context.ingest),
        reason="; ".join(reasons) or None,
    )
    return JSONResponse(answer.model_dump(mode="json"), status_code=503 if reasons else 200)


def _link_health(link: LinkStatus, broker: BrokerView | None) -> MqttLinkHealth:
    return MqttLinkHealth(
        state="connected" if link.connected else "disconnected",
        since=format_time(dt.datetime.fromtimestamp(link.since, dt.timezone.utc)),
        connects=link.connects,
        losses=link.losses,
        broker_restarts=broker.restarts if broker is not None else None,
    )


def _ingestion_health(ingest: Ingestion) -> IngestionHealth:
    last = ingest.last_dead_letter
    return IngestionHealth(
        dead_lettered=sum(ingest.dead_lettered.values()),
        last_dead_letter=None
        if last is None
        else DeadLetterHealth(
            device_id=last.device_id,
            at=format_time(last.at),
            dropped=last.dropped,
            error=last.error,
            kept_id=last.kept_id,
        ),
    )


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics of this server",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(context: ContextDep) -> Response:
    return Response(generate_latest(context.registry), media_type=CONTENT_TYPE_LATEST)
