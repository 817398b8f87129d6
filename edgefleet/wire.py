"""The fleet server's HTTP API as its clients see it: where it lives and how it says no.

The server (`edgefleet.server.api`), the operator's client (`edgefleet.client`)
and a device enrolling (`edgefleet.agent.enroll`) all speak it, so it is
defined here, in the core, and nowhere else:

- every route is under `API_PREFIX`;
- every error answer has the body `{"error": code, "detail": message}`
  (`error_body`), where code is the error class in kebab case (`error_code`),
  the code the CLI prints in `refused [code]: ...` and `error [code]: ...`;
- a client turns a code back into the class the server raised
  (`error_class`): the errors below, or a refusal of the core
  (`edgefleet.errors.UntrustedInputError` and below);
- a refusal of the request (`REFUSALS`: not found, conflict, invalid, auth,
  enrollment; and every core refusal) is `refused [code]: ...` with exit status 1
  on the CLI, like a refusal found locally; anything else (rate limited, storage,
  no answer) is `error [code]: ...` with exit status 2 (`is_refusal`).

The errors the API answers with, besides the core's refusals:

    ServerError                       (an EdgefleetError)
    ├── NotFoundError                 no such bundle, device, rollout or token
    ├── ConflictError                 the request clashes with what is stored
    │   ├── BundleExistsError             another bundle under that name and version
    │   └── RolloutStateError             the rollout's state does not allow the action
    ├── InvalidRequestError           well-formed but not acceptable (an impossible plan, ...)
    ├── AuthError                     no or an unknown credential
    │   └── ForbiddenError                a known credential whose role may not do this
    ├── EnrollmentError               an enrollment token that is unknown, used or expired
    ├── RateLimitedError              too many requests from one caller (HTTP 429)
    └── StorageError                  the database or the data directory failed
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from edgefleet.errors import EdgefleetError, UntrustedInputError

API_PREFIX = "/api/v1"


class ServerError(EdgefleetError):
    """Base of the fleet server's own errors."""


class NotFoundError(ServerError):
    """No such bundle, device, rollout or token."""


class ConflictError(ServerError):
    """The request clashes with what is stored."""


class BundleExistsError(ConflictError):
    """A different bundle is already stored under that name and version."""


class RolloutStateError(ConflictError):
    """The rollout's current state does not allow the action."""


class InvalidRequestError(ServerError):
    """Well-formed, but not acceptable: an impossible plan, a bad selector."""


class AuthError(ServerError):
    """No credential, or one the server does not know."""


class ForbiddenError(AuthError):
    """A known credential whose role may not do this."""


class EnrollmentError(ServerError):
    """An enrollment token that is unknown, already used or expired, or a re-key refused."""


class RateLimitedError(ServerError):
    """Too many requests from one caller; `retry_after` seconds until the next is allowed."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageError(ServerError):
    """The database or the data directory failed; the request changed nothing."""


# The server's answers that refuse the request itself (HTTP 4xx: what was asked for is
# unknown, clashes, is not valid, or may not be done with this credential). The CLI
# prints them as it prints a core refusal: `refused [code]: ...`, exit status 1. A rate
# limit, a storage failure, no answer at all: `error [code]: ...`, exit status 2.
REFUSALS: tuple[type[ServerError], ...] = (
    NotFoundError,
    ConflictError,
    InvalidRequestError,
    AuthError,
    EnrollmentError,
)


def is_refusal(exc: BaseException) -> bool:
    """True for an error that says the input was refused: a core UntrustedInputError, or
    one of the server's `REFUSALS` (the CLI's exit status 1)."""
    return isinstance(exc, (UntrustedInputError, *REFUSALS))


def class_code(cls: type[BaseException]) -> str:
    """`TamperedFileError` -> `tampered-file`; `FileNotFoundError` -> `file-not-found`;
    an acronym stays one word: `URLError` -> `url`, `NotABundleError` -> `not-a-bundle`."""
    name = cls.__name__.removesuffix("Error")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def error_code(exc: EdgefleetError | OSError) -> str:
    """The code of an error, as an error body, a CLI line and a device's report carry it."""
    return class_code(type(exc))


def error_body(code: str, detail: str) -> dict[str, str]:
    """The body of every error answer."""
    return {"error": code, "detail": detail}


def _subclasses(cls: type[EdgefleetError]) -> Iterator[type[EdgefleetError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_WIRE_MODULES = frozenset({"edgefleet.errors", __name__})


def error_class(code: Any) -> type[EdgefleetError] | None:
    """The class an error body's code names: one of this module's errors or a core
    refusal; None for any other code (the answer must not depend on which
    modules happen to be loaded, so subclasses defined elsewhere never count)."""
    classes = [*_subclasses(ServerError), *_subclasses(UntrustedInputError)]
    known = {class_code(cls): cls for cls in classes if cls.__module__ in _WIRE_MODULES}
    return known.get(code) if isinstance(code, str) else None


__all__ = [
    "API_PREFIX",
    "REFUSALS",
    "AuthError",
    "BundleExistsError",
    "ConflictError",
    "EnrollmentError",
    "ForbiddenError",
    "InvalidRequestError",
    "NotFoundError",
    "RateLimitedError",
    "RolloutStateError",
    "ServerError",
    "StorageError",
    "class_code",
    "error_body",
    "error_class",
    "error_code",
    "is_refusal",
]
