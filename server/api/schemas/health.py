"""Health: whether the server is up and its database reachable."""

from __future__ import annotations

from pydantic import BaseModel


class Health(BaseModel):
    status: str
    database: str


__all__ = ["Health"]
