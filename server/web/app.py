"""The pages' part of the server app: `install_pages(app)`.

Adds the page routes (`PAGE_MODULES`, each with a `router`), the server's own
static files at /static, Swagger UI's files (Swagger UI 5, which reads the
OpenAPI 3.1 FastAPI writes, from the `fastapi-offline` package) at
/static/swagger-ui with the API docs page that uses them, and the
handlers that turn `LoginRequired` into a redirect to /login and `PageError`
into the error page. Nothing is loaded from another host.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from edgefleet.server.web import alerts, bundles, device, devicelist, login, overview, rollouts
from edgefleet.server.web.errors import LoginRequired, PageError
from edgefleet.server.web.render import STATIC_PREFIX, render_error

STATIC = Path(__file__).parent / "static"
SWAGGER_PREFIX = f"{STATIC_PREFIX}/swagger-ui"
SWAGGER_FILES = Path(fastapi_offline.__file__).parent / "static"

PAGE_MODULES = (login, overview, devicelist, device, rollouts, bundles, alerts)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    target = "/login"
    if exc.next_path and exc.next_path != "/":
        target += "?" + urlencode({"next": exc.next_path})
    return RedirectResponse(target, status_code=303)


async def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    return render_error(request, exc.status_code, exc.message)


def install_api_docs(app: FastAPI, docs_path: str) -> None:
    """Swagger UI at `docs_path`, from the vendored files (the app has docs_url=None)."""
    openapi_url = app.openapi_url
    assert openapi_url is not None

    @app.get(docs_path, include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title}: API",
            swagger_js_url=f"{SWAGGER_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_PREFIX}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
        )


def install_pages(app: FastAPI, docs_path: str) -> None:
    """The pages, their static files and the API docs (module docstring)."""
    for module in PAGE_MODULES:
        app.include_router(module.router)
    install_api_docs(app, docs_path)
    app.mount(SWAGGER_PREFIX, StaticFiles(directory=SWAGGER_FILES), name="swagger-ui")
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(PageError, _page_error)


__all__ = ["PAGE_MODULES", "install_pages"]
