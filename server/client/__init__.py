"""The fleet server's HTTP API from the outside: `ApiClient` and the CLI groups
`edgefleet bundles`, `edgefleet rollout` and `edgefleet devices`.

Needs httpx and PyYAML only: nothing here imports FastAPI or SQLAlchemy, so an
operator's laptop runs these commands without the server's dependencies.
"""

from edgefleet.server.client.api import DEFAULT_SERVER, ApiClient, JsonObject
from edgefleet.server.client.errors import ServerResponseError, ServerUnreachableError
from edgefleet.server.errors import RateLimitedError

__all__ = [
    "DEFAULT_SERVER",
    "ApiClient",
    "JsonObject",
    "RateLimitedError",
    "ServerResponseError",
    "ServerUnreachableError",
]
