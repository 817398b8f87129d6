"""The audit log: one entry as the API shows it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from edgefleet.server.api.schemas.base import RowView


class AuditPublic(RowView):
    id: int
    at: dt.datetime
    actor: str
    role: str
    action: str
    target: str
    details: dict[str, Any]


__all__ = ["AuditPublic"]
