"""Bundles: a stored bundle as the API shows it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from edgefleet.server.api.schemas.base import RowView


class BundlePublic(RowView):
    """A stored bundle."""

    id: int
    name: str
    version: str
    sha256: str
    length: int
    release_counter: int
    profiles: list[str]
    min_agent_version: str | None
    manifest: dict[str, Any]
    pushed_by: str
    pushed_at: dt.datetime


__all__ = ["BundlePublic"]
