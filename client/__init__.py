"""The fleet server's HTTP API from the outside: `ApiClient` and the CLI groups
`edgefleet bundles`, `edgefleet rollout` and `edgefleet devices`.

Installed with the client extra (`pip install '.[client]'`: httpx and PyYAML).
It imports the core and nothing of the server (an import-linter contract in
pyproject.toml holds it to that), so an operator's laptop runs these commands
without FastAPI, SQLAlchemy or the broker. What it shares with the server, the
API prefix and the error codes, is the core's wire contract (`edgefleet.wire`).
"""

from edgefleet.client.api import DEFAULT_SERVER, ApiClient, JsonObject
from edgefleet.client.errors import ServerResponseError, ServerUnreachableError
from edgefleet.wire import RateLimitedError

__all__ = [
    "DEFAULT_SERVER",
    "ApiClient",
    "JsonObject",
    "RateLimitedError",
    "ServerResponseError",
    "ServerUnreachableError",
]
