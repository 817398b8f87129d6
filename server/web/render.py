"""Rendering a page: `render(request, template, **context)` with the base layout's needs.

Templates live in `templates/` (Jinja2, autoescaped, undefined names are
errors). Every template sees `request`, `user` (the signed-in Principal, or
None on the login page), `csrf_field()` (the hidden field every form must
carry), `static(path)` and the filters `when` (a UTC time, or a device's time
text) and `ago` (a time relative to now). Every page is sent with a Content-Security-Policy that
allows only the server's own scripts, styles and images, and is never cached.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from edgefleet.server.web.auth import csrf_field, signed_in_principal

TEMPLATES = Path(__file__).parent / "templates"
STATIC_PREFIX = "/static"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def format_when(moment: dt.datetime | str | None) -> str:
    """`2026-12-01 12:20:01 UTC`, or `never`. A text is a time a device sent
    (`2026-12-01T12:20:01Z`, as in a heartbeat), shown the same way; one that is not a
    time is shown as it is."""
    if moment is None:
        return "never"
    if isinstance(moment, str):
        try:
            parsed = dt.datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            return moment
        moment = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_ago(moment: dt.datetime | None, now: dt.datetime) -> str:
    """`42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`, or `never`."""
    if moment is None:
        return "never"
    seconds = int((now - moment).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def static_url(path: str) -> str:
    return f"{STATIC_PREFIX}/{path}"


_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters["when"] = format_when
_environment.globals["static"] = static_url


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The page `template` rendered with `context` and the layout's names (module docstring)."""
    now = request.app.state.context.clock()
    page = _environment.get_template(template).render(
        request=request,
        user=signed_in_principal(request),
        csrf_field=lambda: csrf_field(request),
        ago=lambda moment: format_ago(moment, now),
        now=now,
        **context,
    )
    return HTMLResponse(page, status_code=status_code, headers=PAGE_HEADERS)


def render_error(request: Request, status_code: int, message: str) -> HTMLResponse:
    """The error page: the status and what to do."""
    return render(
        request, "error.html", status_code=status_code, status=status_code, message=message
    )


__all__ = [
    "PAGE_HEADERS",
    "STATIC_PREFIX",
    "TEMPLATES",
    "format_ago",
    "format_when",
    "render",
    "render_error",
    "static_url",
]
