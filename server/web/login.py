"""GET/POST /login (an API token for a session cookie) and POST /logout."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from edgefleet.server.api.deps import ContextDep, client_address, get_limiter
from edgefleet.server.errors import AuthError, RateLimitedError
from edgefleet.server.web.auth import SESSION_COOKIE, ViewerPage, read_form, safe_next
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render
from edgefleet.server.web.sessions import SESSION_LIFETIME, close_session, open_session

router = APIRouter(include_in_schema=False)


def _login_page(
    request: Request, next_path: str, message: str | None = None, status_code: int = 200
) -> HTMLResponse:
    return render(
        request, "login.html", status_code=status_code, next_path=next_path, message=message
    )


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _login_page(request, safe_next(next))


def _from_elsewhere(request: Request) -> bool:
    """True when the browser says the form was sent by a page of another site.

    The login form has no CSRF token (there is no session yet), so a page of another site
    could sign a visitor in with the other site's token and watch what they then do. Browsers
    send Origin with every form POST; one naming another host than this request's is refused.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return False  # not a browser form (a script): nothing to forge
    return urlsplit(origin).netloc != request.headers.get("host", "")


@router.post("/login")
async def login(request: Request, context: ContextDep) -> Response:
    """A valid API token opens a session; a wrong one costs from the failed-login bucket."""
    if _from_elsewhere(request):
        raise PageError(403, "sign in from this site's own login page")
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    secret = form.get("token", "").strip()

    def sign_in() -> str:
        with context.db.session() as session:
            session_id, _ = open_session(session, secret, context.clock())
        return session_id

    try:
        session_id = await run_in_threadpool(sign_in)
    except AuthError:
        try:
            get_limiter(request).check(f"failed-login:{client_address(request)}")
        except RateLimitedError as exc:
            return _login_page(request, next_path, str(exc), status_code=429)
        message = "unknown or revoked API token: paste an efa_ token from your admin"
        return _login_page(request, next_path, message, status_code=401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
def logout(request: Request, context: ContextDep, _user: ViewerPage) -> Response:
    with context.db.session() as session:
        close_session(session, request.cookies[SESSION_COOKIE])
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


__all__ = ["router"]
