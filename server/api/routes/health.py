"""GET /health (no token: for load balancers) and GET /metrics (Prometheus, at the root)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from edgefleet.server.api.deps import ContextDep
from edgefleet.server.api.schemas.health import Health
from edgefleet.server.errors import StorageError
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=Health,
    summary="Is the server up and its database reachable",
    responses={503: {"model": Health, "description": "the database does not answer"}},
)
def health(context: ContextDep) -> JSONResponse:
    try:
        with context.db.session() as session:
            session.execute(text("SELECT 1"))
    except StorageError:
        return JSONResponse({"status": "degraded", "database": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics of this server",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(context: ContextDep) -> Response:
    return Response(generate_latest(context.registry), media_type=CONTENT_TYPE_LATEST)
