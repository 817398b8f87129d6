"""Alerts: opened and resolved by the evaluators (drift, accuracy), listed, acknowledged.

Every alert is opened with `open_alert` and resolved with `resolve_alert`, in
the evaluator's unit of work: the one place that sees every change of an
alert's life. Each change (opened, resolved, acknowledged) records its webhook
event in the same unit of work (`edgefleet.server.webhooks.events`).

Acknowledging says a person has seen an alert; it neither resolves it nor
stops the evaluator from resolving it. It is audited ("alert.ack");
acknowledging an alert again changes nothing and records nothing.
"""

from __future__ import annotations

import builtins
import datetime as dt
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import Alert
from edgefleet.server.errors import NotFoundError
from edgefleet.server.principals import Principal
from edgefleet.server.webhooks.events import (
    ALERT_ACKNOWLEDGED,
    ALERT_OPENED,
    ALERT_RESOLVED,
    record_event,
)


def open_alert(session: Session, alert: Alert) -> Alert:
    """Store a new alert (its id is set when this returns)."""
    session.add(alert)
    session.flush()
    record_event(session, ALERT_OPENED, alert, alert.opened_at)
    return alert


def resolve_alert(
    session: Session, alert: Alert, now: dt.datetime, resolved_by: dict[str, Any]
) -> None:
    """Resolve an open alert; `resolved_by` (the evidence that closed it) joins its evidence."""
    alert.resolved_at = now
    alert.evidence = {**alert.evidence, "resolved_by": resolved_by}
    record_event(session, ALERT_RESOLVED, alert, now)


def list_alerts(
    session: Session,
    *,
    device: str | None = None,
    cohort: str | None = None,
    bundle: str | None = None,
    version: str | None = None,
    kind: str | None = None,
    open_only: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> builtins.list[Alert]:
    """Alerts, newest first: of one device (`device`), one cohort (`cohort`, exactly:
    "version", "tag:K=V", ...), one bundle name and version, one kind; unresolved ones
    only (`open_only`); `limit` of them after skipping `offset`."""
    query = select(Alert).order_by(Alert.opened_at.desc(), Alert.id.desc())
    query = _filtered(query, device, cohort, bundle, version, kind, open_only)
    return list(session.scalars(query.limit(limit).offset(offset)))


def count_alerts(
    session: Session,
    *,
    device: str | None = None,
    cohort: str | None = None,
    bundle: str | None = None,
    version: str | None = None,
    kind: str | None = None,
    open_only: bool = False,
) -> int:
    """How many alerts `list_alerts` with these filters finds, over every page."""
    query = _filtered(
        select(func.count()).select_from(Alert), device, cohort, bundle, version, kind, open_only
    )
    return int(session.scalar(query) or 0)


def _filtered(
    query: Select[Any],
    device: str | None,
    cohort: str | None,
    bundle: str | None,
    version: str | None,
    kind: str | None,
    open_only: bool,
) -> Select[Any]:
    for column, wanted in (
        (Alert.device_id, device),
        (Alert.cohort, cohort),
        (Alert.bundle_name, bundle),
        (Alert.bundle_version, version),
        (Alert.kind, kind),
    ):
        if wanted is not None:
            query = query.where(column == wanted)
    if open_only:
        query = query.where(Alert.resolved_at.is_(None))
    return query


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
        record_event(session, ALERT_ACKNOWLEDGED, alert, now)
    return alert


def open_alerts_by_kind(session: Session) -> dict[str, int]:
    """How many alerts are open, per kind."""
    query = select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
    return {str(kind): int(count) for kind, count in session.execute(query)}


__all__ = [
    "acknowledge_alert",
    "count_alerts",
    "list_alerts",
    "open_alert",
    "open_alerts_by_kind",
    "resolve_alert",
]
