"""Drift alerts: listing and acknowledgement (the evaluator opens and resolves them).

Acknowledging says a person has seen an alert; it neither resolves it nor
stops the evaluator from resolving it. It is audited ("alert.ack");
acknowledging an alert again changes nothing and records nothing.
"""

from __future__ import annotations

import builtins
import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import Alert
from edgefleet.server.errors import NotFoundError
from edgefleet.server.principals import Principal


def list_alerts(
    session: Session, *, device: str | None = None, open_only: bool = False, limit: int = 100
) -> builtins.list[Alert]:
    """Alerts, newest first: of one device (`device`), unresolved ones only (`open_only`)."""
    query = select(Alert).order_by(Alert.opened_at.desc(), Alert.id.desc()).limit(limit)
    if device is not None:
        query = query.where(Alert.device_id == device)
    if open_only:
        query = query.where(Alert.resolved_at.is_(None))
    return list(session.scalars(query))


def acknowledge_alert(session: Session, alert_id: int, actor: Principal, now: dt.datetime) -> Alert:
    """Mark alert `alert_id` seen by `actor` (audited the first time).

    Raises:
        NotFoundError: no such alert.
    """
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFoundError(f"no alert {alert_id}: `edgefleet alerts list` shows them")
    if alert.acknowledged_at is None:
        alert.acknowledged_by = actor.name
        alert.acknowledged_at = now
        record_audit(
            session,
            actor,
            "alert.ack",
            f"alert {alert_id}",
            {"kind": alert.kind, "scope": alert.scope, "feature": alert.feature},
            now=now,
        )
    return alert


def open_alerts_by_kind(session: Session) -> dict[str, int]:
    """How many alerts are open, per kind."""
    query = select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
    return {str(kind): int(count) for kind, count in session.execute(query)}


__all__ = ["acknowledge_alert", "list_alerts", "open_alerts_by_kind"]
