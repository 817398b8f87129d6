"""Typed dependencies of the routes: the context, a unit of work, the caller.

    ContextDep      the ServerContext the app was built with
    SessionDep      a unit of work, committed before the answer is sent
    ViewerDep       a Principal of at least the viewer role (likewise OperatorDep,
                    AdminDep); checked once here, never in the routes
    EnrollLimitDep  the per-address rate limit of enrollment (no token)

Authentication: `Authorization: Bearer <API token>`. No header, an unknown
secret (an enrollment token included: it is not an API token) or a revoked
token is a 401; a known token of too low a role a 403. Every authenticated
request takes a token from its API token's bucket; every failed
authentication one from its client address's failed-login bucket, so guessing
is throttled too. Enrollment has a bucket of its own per address: failed
logins from an address never throttle enrollment from it, nor the reverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from edgefleet.server.api.ratelimit import RateLimiter
from edgefleet.server.context import ServerContext
from edgefleet.server.errors import AuthError, ForbiddenError
from edgefleet.server.principals import Principal, Role
from edgefleet.server.tokens import authenticate

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token (`efa_...`) from `edgefleet server token create` or POST /tokens.",
)


def get_context(request: Request) -> ServerContext:
    return cast(ServerContext, request.app.state.context)


ContextDep = Annotated[ServerContext, Depends(get_context)]


def get_limiter(request: Request) -> RateLimiter:
    return cast(RateLimiter, request.app.state.limiter)


LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """A unit of work for one request (rolled back when the route raises).

    Raises:
        StorageError: the commit failed; with scope="function" this happens
            before the answer is sent, so the client sees 503, not a false 2xx.
    """
    with context.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def limit_failed_login(request: Request, limiter: LimiterDep) -> None:
    """Take a token from the caller's address bucket of failed authentications.

    Raises:
        RateLimitedError: the address failed to authenticate too often.
    """
    limiter.check(f"failed-login:{client_address(request)}")


def limit_enrollment(request: Request, limiter: LimiterDep) -> None:
    """Take a token from the caller's address bucket of enrollments.

    Raises:
        RateLimitedError: the address made too many enrollment requests.
    """
    limiter.check(f"enroll:{client_address(request)}")


EnrollLimitDep = Annotated[None, Depends(limit_enrollment)]


def get_principal(
    request: Request,
    context: ContextDep,
    limiter: LimiterDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from the bearer token.

    Raises:
        AuthError: no bearer token, or an unknown or revoked one.
        RateLimitedError: the token (or, failing authentication, the address)
            made too many requests.
    """
    if credentials is None or not credentials.credentials:
        limit_failed_login(request, limiter)
        raise AuthError("an API token is required: send 'Authorization: Bearer <token>'")
    secret = credentials.credentials
    try:
        with context.db.session() as session:
            principal = authenticate(session, secret)
    except AuthError:
        limit_failed_login(request, limiter)
        raise
    limiter.check("token:" + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:32])
    return principal


def require_role(role: Role) -> Callable[[Principal], Principal]:
    """A dependency: the caller, when its role allows `role`'s actions."""

    def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.role.allows(role):
            raise ForbiddenError(
                f"token {principal.name!r} has the {principal.role.value} role; "
                f"this needs {role.value}"
            )
        return principal

    return dependency


ViewerDep = Annotated[Principal, Depends(require_role(Role.VIEWER))]
OperatorDep = Annotated[Principal, Depends(require_role(Role.OPERATOR))]
AdminDep = Annotated[Principal, Depends(require_role(Role.ADMIN))]

__all__ = [
    "AdminDep",
    "ContextDep",
    "EnrollLimitDep",
    "LimiterDep",
    "OperatorDep",
    "SessionDep",
    "ViewerDep",
    "client_address",
    "get_context",
    "get_principal",
    "require_role",
]
