"""The audit log: who pushed, started, paused, resumed or aborted what.

An entry is added in the same unit of work as the change it describes, so the
log never claims a change that was rolled back, nor misses one that was kept.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import AuditEntry
from edgefleet.server.principals import Principal
from edgefleet.timefmt import utcnow


def record_audit(
    session: Session,
    actor: Principal,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> AuditEntry:
    """Add an entry to the unit of work `session` (committed with it)."""
    entry = AuditEntry(
        at=now or utcnow(),
        actor=actor.name,
        role=actor.role.value,
        action=action,
        target=target,
        details=details or {},
    )
    session.add(entry)
    return entry


def list_audit(
    session: Session, *, limit: int = 100, before_id: int | None = None
) -> list[AuditEntry]:
    """Newest first; `before_id` pages back."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(session.scalars(query))
