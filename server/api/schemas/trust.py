"""The fleet's trust root as the server holds it."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field


class TrustRootPublic(BaseModel):
    """The newest trust root version the server holds (devices walk up to it)."""

    version: int = Field(description="The newest stored version.")
    expires: dt.datetime = Field(description="When that version expires.")
    server_keyids: list[str] = Field(description="The key ids of its server role.")
