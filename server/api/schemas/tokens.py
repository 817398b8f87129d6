"""API tokens: creation, and a token as listed."""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from edgefleet.server.api.schemas.base import PRINTABLE, RequestBody, RowView
from edgefleet.server.principals import Role


class TokenCreate(RequestBody):
    name: str = Field(min_length=1, max_length=128, pattern=PRINTABLE)
    role: Role


class TokenPublic(RowView):
    """An API token as listed: never its secret, which only creation shows."""

    id: int
    name: str
    role: Role
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret: shown this once, never stored.")


__all__ = ["TokenCreate", "TokenCreated", "TokenPublic"]
