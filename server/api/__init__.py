"""The fleet server's HTTP API (FastAPI): `edgefleet.server.api.app.create_app(context)`.

Importing this package builds nothing: the domain modules import their bodies
from `edgefleet.server.api.schemas` without loading the app and its routes.
"""
