"""The FastAPI application of one server: `create_app(context)`.

Nothing happens at import time: the app, its rate limiter and its metrics are
built from the `ServerContext` the runner (or a test) passes in, so two apps
in one process share nothing.

Layers, outermost first: metrics (counts every answer, 413s and 500s too),
the body cap, FastAPI's routing with the error handlers of
`edgefleet.server.api.errors`. Routes live under /api/v1 except /metrics and
the pages for browsers (`edgefleet.server.web`: /, /login, /devices, ...,
their files under /static, and the API docs at /api/v1/docs).
"""

from __future__ import annotations

from fastapi import FastAPI

from edgefleet.server.api.errors import install_error_handlers
from edgefleet.server.api.limits import MAX_JSON_BODY, BodyLimitMiddleware
from edgefleet.server.api.metrics import MetricsMiddleware, register_metrics
from edgefleet.server.api.ratelimit import RateLimiter
from edgefleet.server.api.routes import (
    accuracy,
    alerts,
    audit,
    benchmarks,
    blobs,
    bundles,
    certificates,
    deadletters,
    devices,
    diagnostics,
    enroll,
    health,
    rollouts,
    samples,
    tokens,
    trust,
    webhooks,
)
from edgefleet.server.context import ServerContext
from edgefleet.server.web.app import install_pages
from edgefleet.wire import API_PREFIX

API_VERSION = "1"

DESCRIPTION = """\
The edgefleet fleet server: bundles, devices, rollouts, drift alerts.

Authenticate with `Authorization: Bearer <API token>`. Roles: viewer (read),
operator (push bundles, run rollouts, acknowledge alerts, mint enrollment tokens), admin (tokens,
audit log, trust roots). Every error answer is `{"error": code, "detail": message}`.
"""


def create_app(context: ServerContext) -> FastAPI:
    """The API of the server described by `context` (one app per context).

    Raises:
        ValueError: an app was already created for this context's metrics registry.
    """
    app = FastAPI(
        title="edgefleet fleet server",
        version=API_VERSION,
        description=DESCRIPTION,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served by install_pages from the vendored Swagger UI files
        redoc_url=None,
    )
    app.state.context = context
    app.state.limiter = RateLimiter(context.settings.api_rate_per_minute)
    install_error_handlers(app)

    # enroll before devices: /devices/enroll is not /devices/{device_id}
    routers = (
        health,
        enroll,
        bundles,
        blobs,
        devices,
        diagnostics,
        benchmarks,
        rollouts,
        alerts,
        accuracy,
        webhooks,
        samples,
        deadletters,
        certificates,
        tokens,
        trust,
        audit,
    )
    for module in routers:
        app.include_router(module.router)
    app.include_router(health.metrics_router)
    install_pages(app, docs_path=f"{API_PREFIX}/docs")

    app.add_middleware(
        BodyLimitMiddleware,
        limit=MAX_JSON_BODY,
        exempt=frozenset(
            {
                ("POST", f"{API_PREFIX}/bundles"),
                ("POST", f"{API_PREFIX}/benchmarks"),
                ("POST", f"{API_PREFIX}/devices/*/samples"),
            }
        ),
    )
    app.add_middleware(MetricsMiddleware, metrics=register_metrics(context))
    return app


__all__ = ["create_app"]
