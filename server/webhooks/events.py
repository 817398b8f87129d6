"""Alert events, recorded as `WebhookDelivery` rows in the unit of work that changes the alert.

An event is stored with the change it reports: a change rolled back records
nothing, and a change committed never loses its event. Events are recorded only
in the units of work of a database whose sessions were marked with
`record_alert_events` (the server does so when it has a webhook URL).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from edgefleet.server.api.schemas.alerts import AlertPublic
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Alert, WebhookDelivery
from edgefleet.timefmt import format_time

ALERT_OPENED = "alert.opened"
ALERT_RESOLVED = "alert.resolved"
ALERT_ACKNOWLEDGED = "alert.acknowledged"
EVENTS = (ALERT_OPENED, ALERT_RESOLVED, ALERT_ACKNOWLEDGED)

# Session.info key: the server's public URL, named in each event; absent: no events.
_SERVER_URL = "edgefleet.webhook_server_url"


def record_alert_events(db: Database, server_url: str) -> None:
    """Make every later unit of work of `db` record the alert events it causes."""
    db.session_info[_SERVER_URL] = server_url


def event_payload(
    event: str, alert: Alert, occurred_at: dt.datetime, server_url: str
) -> dict[str, Any]:
    """The JSON body of an event: the alert as the API shows it, when, and which server."""
    return {
        "event": event,
        "occurred_at": format_time(occurred_at),
        "alert": AlertPublic.model_validate(alert).model_dump(mode="json"),
        "server": server_url,
    }


def record_event(session: Session, event: str, alert: Alert, occurred_at: dt.datetime) -> None:
    """Queue `event` about `alert` (flushed, so it has an id) for delivery, if events are on."""
    server_url = session.info.get(_SERVER_URL)
    if server_url is None:
        return
    session.add(
        WebhookDelivery(
            alert_id=alert.id,
            event=event,
            payload=event_payload(event, alert, occurred_at, server_url),
            created_at=occurred_at,
            attempts=0,
            next_attempt_at=occurred_at,
        )
    )


__all__ = [
    "ALERT_ACKNOWLEDGED",
    "ALERT_OPENED",
    "ALERT_RESOLVED",
    "EVENTS",
    "event_payload",
    "record_alert_events",
    "record_event",
]
