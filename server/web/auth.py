"""Who is looking at a page: the session cookie, the roles, the CSRF check.

    require_viewer    a dependency giving the signed-in Principal (any role);
    require_operator  the same for an operator or admin (viewers get 403);
                      both send a browser without a live session to /login,
                      and check the CSRF token of every POST (403 without it)
    csrf_field(request)  the hidden form field that carries the CSRF token
    read_form(request)   the fields of a URL-encoded form body

Pages are for browsers: the API's bearer tokens are not accepted here, and
the session cookie is not accepted by the API. A POST must carry the
session's CSRF token in the field `csrf_token` of a URL-encoded form, besides
the cookie being SameSite=Strict.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Depends, Request
from markupsafe import Markup, escape

from edgefleet.server.api.deps import ContextDep
from edgefleet.server.principals import Principal, Role
from edgefleet.server.web.errors import LoginRequired, PageError
from edgefleet.server.web.sessions import SignedIn, find_session

SESSION_COOKIE = "edgefleet_session"
CSRF_FIELD = "csrf_token"


def safe_next(path: str | None) -> str:
    """`path` when it is a path on this site, else `/` (no redirect can leave the site)."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    if any(ord(char) < 0x20 or char == "\\" for char in path):
        return "/"
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return "/"
    return path


def _requested_path(request: Request) -> str | None:
    """Where to come back after signing in: the page asked for (GET only)."""
    if request.method != "GET":
        return None
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def signed_in(request: Request, context: ContextDep) -> SignedIn:
    """The session of the request's cookie.

    Raises:
        LoginRequired: no cookie, or its session is unknown, expired or its token revoked.
    """
    session_id = request.cookies.get(SESSION_COOKIE)
    found = None
    if session_id:
        with context.db.session() as session:
            found = find_session(session, session_id, context.clock())
    if found is None:
        raise LoginRequired(_requested_path(request))
    request.state.signed_in = found
    return found


async def read_form(request: Request) -> dict[str, str]:
    """The fields of the request's URL-encoded body (the last value of a repeated one)."""
    body = await request.body()
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def check_csrf(request: Request, session: SignedIn) -> None:
    """Raises: PageError (403) when a POST lacks the session's CSRF token."""
    if request.method != "POST":
        return
    sent = (await read_form(request)).get(CSRF_FIELD, "")
    if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise PageError(
            403, "the form's security token is missing or stale: reload the page and try again"
        )


def _require(role: Role) -> Callable[[Request, SignedIn], Awaitable[Principal]]:
    async def dependency(
        request: Request, session: Annotated[SignedIn, Depends(signed_in)]
    ) -> Principal:
        await check_csrf(request, session)
        principal = session.principal
        if not principal.role.allows(role):
            raise PageError(
                403,
                f"{principal.name} has the {principal.role.value} role; "
                f"this needs {role.value}: ask an admin for an {role.value} token",
            )
        return principal

    return dependency


require_viewer = _require(Role.VIEWER)
require_operator = _require(Role.OPERATOR)

ViewerPage = Annotated[Principal, Depends(require_viewer)]
OperatorPage = Annotated[Principal, Depends(require_operator)]


def signed_in_principal(request: Request) -> Principal | None:
    """The Principal the request's dependencies found signed in, if any."""
    found: SignedIn | None = getattr(request.state, "signed_in", None)
    return found.principal if found else None


def csrf_field(request: Request) -> Markup:
    """The hidden field with the session's CSRF token, for every form of a page."""
    found: SignedIn | None = getattr(request.state, "signed_in", None)
    token = found.csrf_token if found else ""
    return Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(token)}">')


__all__ = [
    "CSRF_FIELD",
    "SESSION_COOKIE",
    "OperatorPage",
    "ViewerPage",
    "csrf_field",
    "read_form",
    "require_operator",
    "require_viewer",
    "safe_next",
    "signed_in",
    "signed_in_principal",
]
