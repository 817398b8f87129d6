"""How an API answer becomes an error on the client side.

The server's error bodies are `{"error": code, "detail": message}` where code
is the error class in kebab case (`edgefleet.cli.errors.error_code`). The
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
import re
from collections.abc import Iterator
from typing import Any

from edgefleet.errors import EdgefleetError, UntrustedInputError
from edgefleet.server.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    StorageError,
)


class ServerUnreachableError(ServerError):
    """No connection to the server, or no answer in time; the request may not have arrived."""


class ServerResponseError(ServerError):
    """An answer that is not one of the API's errors (an internal error, a proxy's page)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_SHARED_MODULES = frozenset({"edgefleet.errors", "edgefleet.server.errors"})

_BY_STATUS: dict[int, type[EdgefleetError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    503: StorageError,
}


def _subclasses(cls: type[EdgefleetError]) -> Iterator[type[EdgefleetError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _code_of(cls: type[EdgefleetError]) -> str:
    # The rule of edgefleet.cli.errors.error_code, applied to a class.
    name = cls.__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _known_codes() -> dict[str, type[EdgefleetError]]:
    # Only the two shared trees: the answer must not depend on which modules are loaded.
    classes = [*_subclasses(ServerError), *_subclasses(UntrustedInputError)]
    return {_code_of(cls): cls for cls in classes if cls.__module__ in _SHARED_MODULES}


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
    code = parsed.get("error")
    if status == 429:
        seconds = _seconds(retry_after)
        suffix = f" (retry after {seconds:g} s)" if seconds is not None else ""
        return RateLimitedError(message + suffix, seconds)
    cls = _known_codes().get(code) if isinstance(code, str) else None
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
