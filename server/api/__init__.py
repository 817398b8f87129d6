"""The fleet server's HTTP API (FastAPI): `create_app(context)`."""

from edgefleet.server.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
