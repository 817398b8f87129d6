"""Every error the fleet server's domain code raises, in one tree.

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
    ├── BrokerError                   the embedded MQTT broker could not start
    └── StorageError                  the database or the data directory failed

Untrusted input from devices and API clients that fails the core's checks
raises the core's errors (`edgefleet.errors`); the API maps both trees to HTTP
statuses in one place (`edgefleet.server.api.errors`). Domain code never lets
SQLAlchemy, paho or FastAPI exceptions through.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError


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


class BrokerError(ServerError):
    """The embedded broker could not start (port taken, iotcore missing or failing)."""


class StorageError(ServerError):
    """The database or the data directory failed; the request changed nothing."""
