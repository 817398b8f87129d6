"""The one place where errors become HTTP answers.

Every error answer has the body `{"error": code, "detail": message}`
(`edgefleet.wire.error_body`). The code is the error class in kebab case
(`edgefleet.wire.error_code`), so the CLI's client raises the same class with
the same message; errors that are not
ours get a code by status (`not-found`, `method-not-allowed`, ...).

    NotFoundError                 404
    ConflictError (and below)     409
    InvalidRequestError           422  (RangeNotSatisfiableError 416, BodyTooLargeError 413)
    AuthError                     401  (ForbiddenError: 403)
    EnrollmentError               403
    StorageError                  503
    RateLimitedError              429  with Retry-After
    UntrustedInputError (core)    422  with the refusal code (bad-signature, ...)
    request validation            422  `invalid-request`, naming the field
    anything else                 500  `internal` (a bug: logged with its traceback)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.errors import EdgefleetError, UntrustedInputError
from edgefleet.server.errors import (
    AuthError,
    ConflictError,
    EnrollmentError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    StorageError,
)
from edgefleet.server.ranges import RangeNotSatisfiableError, unsatisfied_range
from edgefleet.wire import error_body, error_code

log = logging.getLogger(__name__)


class BodyTooLargeError(InvalidRequestError):
    """A request body over the limit of its route (HTTP 413)."""


# Most specific first.
_STATUS: list[tuple[type[EdgefleetError], int]] = [
    (RangeNotSatisfiableError, 416),
    (BodyTooLargeError, 413),
    (RateLimitedError, 429),
    (ForbiddenError, 403),
    (AuthError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidRequestError, 422),
    (EnrollmentError, 403),
    (StorageError, 503),
    (UntrustedInputError, 422),
]

_CODES_BY_STATUS = {
    400: "bad-request",
    401: "auth",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    416: "range-not-satisfiable",
    422: "invalid-request",
    429: "rate-limited",
    503: "storage",
}

MAX_VALIDATION_ERRORS = 5


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
    detail: str


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


def status_of(exc: EdgefleetError) -> int:
    """The HTTP status an edgefleet error answers with (500: not one a request causes)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


async def _edgefleet_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EdgefleetError)
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, RangeNotSatisfiableError):
        headers["Content-Range"] = unsatisfied_range(exc.length)
    elif isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after)
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(status, error_code(exc), str(exc), headers)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_detail(errors: Sequence[Any]) -> str:
    """`body.plan: Field required; query.limit: ...` (the first few errors)."""
    parts = []
    for error in list(errors)[:MAX_VALIDATION_ERRORS]:
        where = _location(error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error")
            message = f"not valid JSON ({reason})" if reason else "not valid JSON"
        parts.append(f"{where}: {message}")
    if len(errors) > MAX_VALIDATION_ERRORS:
        parts.append(f"and {len(errors) - MAX_VALIDATION_ERRORS} more")
    return "; ".join(parts) or "the request is not valid"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid-request", validation_detail(exc.errors()))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES_BY_STATUS.get(exc.status_code, f"http-{exc.status_code}")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, code, detail, dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the API's error body (see the module docstring)."""
    app.add_exception_handler(EdgefleetError, _edgefleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


# For route declarations: the error answers every authenticated route may give.
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no, an unknown or a revoked API token"},
    403: {"model": ErrorBody, "description": "the token's role may not do this"},
    422: {"model": ErrorBody, "description": "the request is not valid"},
    429: {"model": ErrorBody, "description": "too many requests; see Retry-After"},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`AUTH_ERRORS` plus `ErrorBody` answers for `statuses`, for `responses=`."""
    out = dict(AUTH_ERRORS)
    for status in statuses:
        out[status] = {"model": ErrorBody}
    return out


__all__ = [
    "AUTH_ERRORS",
    "BodyTooLargeError",
    "ErrorBody",
    "error_response",
    "errors",
    "install_error_handlers",
    "status_of",
    "validation_detail",
]
