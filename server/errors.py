"""Every error the fleet server's domain code raises, in one tree.

    ServerError                       (an EdgefleetError)
    ├── NotFoundError                 no such bundle, device, rollout, token or alert
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

All but BrokerError are answers of the HTTP API, which its clients raise too:
they are defined in the core's wire contract (`edgefleet.wire`) and named
here so that the server's code imports its errors from one place.

Untrusted input from devices and API clients that fails the core's checks
raises the core's errors (`edgefleet.errors`); the API maps both trees to HTTP
statuses in one place (`edgefleet.server.api.errors`). Domain code never lets
SQLAlchemy, paho or FastAPI exceptions through.
"""

from __future__ import annotations

from edgefleet.wire import (
    AuthError,
    BundleExistsError,
    ConflictError,
    EnrollmentError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    RolloutStateError,
    ServerError,
    StorageError,
)


class BrokerError(ServerError):
    """The embedded broker could not start (port taken, iotcore missing or failing)."""


__all__ = [
    "AuthError",
    "BrokerError",
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
]
