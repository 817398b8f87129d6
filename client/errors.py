"""How an API answer becomes an error on the client side.

The server's error bodies are `{"error": code, "detail": message}` where code
is the error class in kebab case (the wire contract, `edgefleet.wire`). The
client raises the same class the server raised, with the server's message, so
`edgefleet rollout pause 3` prints exactly what the server refused and why:

    code known (a ServerError or a core UntrustedInputError)  -> that class
    otherwise by HTTP status: 401 AuthError, 403 ForbiddenError,
        404 NotFoundError, 409 ConflictError, 413/422 InvalidRequestError,
        429 RateLimitedError, 503 StorageError, anything else ServerResponseError

Core refusals (a bundle whose signature does not verify, ...) thus print as
`refused [bad-signature]: ...` with exit status 1, as they do locally.

Errors added here, for what only a client sees (all ServerErrors):

    ServerUnreachableError  no connection, or no answer in time
    ServerResponseError     an answer that is not the API's (a proxy's 502, a 500)
"""

from __future__ import annotations

import json
from typing import Any

from edgefleet.errors import EdgefleetError
from edgefleet.wire import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    StorageError,
    error_class,
)


class ServerUnreachableError(ServerError):
    """No connection to the server, or no answer in time; the request may not have arrived."""


class ServerResponseError(ServerError):
    """An answer that is not one of the API's errors (an internal error, a proxy's page)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_BY_STATUS: dict[int, type[EdgefleetError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    503: StorageError,
}


def _detail_text(detail: Any) -> str:
    """The message of an error body; FastAPI's own validation lists are flattened."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail)


def error_from_response(
    status: int, body: bytes, *, url: str, retry_after: str | None = None
) -> EdgefleetError:
    """The error to raise for an error answer (status >= 400) to a request for `url`."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not (isinstance(parsed, dict) and "detail" in parsed):
        snippet = body[:200].decode("utf-8", "replace").strip()
        return ServerResponseError(
            f"HTTP {status} from {url}" + (f": {snippet}" if snippet else ""), status
        )
    message = _detail_text(parsed["detail"])
    if status == 429:
        seconds = _seconds(retry_after)
        suffix = f" (retry after {seconds:g} s)" if seconds is not None else ""
        return RateLimitedError(message + suffix, seconds)
    cls = error_class(parsed.get("error"))
    if cls is None:
        cls = _BY_STATUS.get(status)
    if cls is None:
        return ServerResponseError(f"HTTP {status} from {url}: {message}", status)
    return cls(message)


def _seconds(header: str | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
