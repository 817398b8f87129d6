"""The delivery worker: recorded alert events POSTed to the webhook, signed, retried.

One replica delivers: the one holding the lease "webhook-delivery". A tick
sends, one at a time and oldest first, every delivery that is due: undelivered,
with attempts left, `next_attempt_at` reached, and no earlier undelivered event
of the same alert (so a receiver never gets an alert's "resolved" before its
"opened"; a failed one holds the later ones back until it is retried).

Each delivery is claimed before it is sent, in one transaction with the lease:
its `next_attempt_at` moves past the send's timeout, by an update that matches
only the value read. A replica that takes the lease over meanwhile finds the
row not due; two replicas that read it at once cannot both claim it. The result
is stored only by the claim's holder. A replica that dies between sending and
storing the result leaves the claim to expire, and the event is sent again:
delivery is at least once, and `X-Edgefleet-Delivery` lets a receiver drop the
repeat.

A 2xx answer is delivered. Anything else, or a network error, is a failed
attempt: logged at WARNING, its status and error stored, the next one after
`BACKOFF` (5 s doubling to 1 h, jittered); after `webhook_max_attempts` the
delivery is given up (failed) until an operator retries it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import CursorResult, exists, select, update
from sqlalchemy.orm import Session, aliased

from edgefleet.backoff import Backoff
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import WebhookDelivery
from edgefleet.server.leases import acquire_lease
from edgefleet.server.settings import ServerSettings
from edgefleet.server.webhooks.signing import signed_headers
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)

LEASE_NAME = "webhook-delivery"
BACKOFF = Backoff(initial=5.0, maximum=3600.0)
MAX_PER_TICK = 100  # the rest waits for the next tick, which follows at once
CLAIM_MARGIN = dt.timedelta(seconds=30)  # beyond the send's timeout


@dataclass(frozen=True)
class _Claim:
    id: int
    event: str
    payload: dict[str, Any]
    attempts: int  # before this one
    until: dt.datetime


@dataclass
class DeliveryReport:
    """What one tick did (for the worker and tests)."""

    held: bool = False
    delivered: list[int] = field(default_factory=list)  # delivery ids
    failed: list[int] = field(default_factory=list)  # failed attempts' delivery ids

    @property
    def saturated(self) -> bool:
        return len(self.delivered) + len(self.failed) >= MAX_PER_TICK


class WebhookDeliverer:
    """Sends due deliveries when this replica holds the lease. See the module docstring."""

    def __init__(
        self,
        db: Database,
        settings: ServerSettings,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        """Raises: ValueError when the settings have no webhook URL or secret."""
        if settings.webhook_url is None or not settings.webhook_secret:
            raise ValueError("a webhook deliverer needs settings.webhook_url and webhook_secret")
        self.db = db
        self.settings = settings
        self.url = settings.webhook_url
        self.secret = settings.webhook_secret
        self.clock = clock
        self.rng = rng or random.Random()
        self.claim_for = dt.timedelta(seconds=settings.webhook_timeout_s) + CLAIM_MARGIN
        # Held across ticks: a replica that delivers keeps delivering.
        self.lease_ttl = max(
            settings.lease_ttl,
            2 * dt.timedelta(seconds=settings.webhook_interval_s) + self.claim_for,
        )
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def tick(self) -> DeliveryReport:
        """Send every due delivery (up to `MAX_PER_TICK`), each claimed first.

        Raises:
            StorageError: the database failed (a claimed delivery is sent again later).
        """
        report = DeliveryReport()
        while not report.saturated:
            with self.db.session() as session:
                now = self.clock()
                if not acquire_lease(
                    session, LEASE_NAME, self.settings.replica_id, self.lease_ttl, now=now
                ):
                    return report
                report.held = True
                claim = self._claim_next(session, now)
            if claim is None:
                return report
            status, error = self._send(claim)
            if error is None:
                report.delivered.append(claim.id)
            else:
                report.failed.append(claim.id)
            self._store_result(claim, status, error)
        return report

    def _claim_next(self, session: Session, now: dt.datetime) -> _Claim | None:
        max_attempts = self.settings.webhook_max_attempts
        while True:
            delivery = session.scalars(_due(now, max_attempts).limit(1)).first()
            if delivery is None:
                return None
            until = now + self.claim_for
            claimed = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery.id)
                .where(WebhookDelivery.next_attempt_at == delivery.next_attempt_at)
                .values(next_attempt_at=until)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(claimed) == 1:
                return _Claim(
                    delivery.id, delivery.event, delivery.payload, delivery.attempts, until
                )
            session.expire(delivery)  # another replica claimed it: look again

    def _send(self, claim: _Claim) -> tuple[int | None, str | None]:
        """POST one event: (HTTP status or None, None when delivered or what went wrong)."""
        body = json.dumps(claim.payload, separators=(",", ":"), sort_keys=True).encode()
        timestamp = int(self.clock().timestamp())
        headers = signed_headers(self.secret, claim.event, claim.id, timestamp, body)
        try:
            response = self.http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.is_success:
            return response.status_code, None
        return response.status_code, f"{response.status_code} {response.reason_phrase}".strip()

    def _store_result(self, claim: _Claim, status: int | None, error: str | None) -> None:
        now = self.clock()
        attempts = claim.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status, "last_error": error}
        max_attempts = self.settings.webhook_max_attempts
        if error is None:
            values["delivered_at"] = now
        elif attempts < max_attempts:
            delay = BACKOFF.delay(attempts - 1, self.rng)
            values["next_attempt_at"] = now + dt.timedelta(seconds=delay)
            log.warning(
                "webhook %s: %s (delivery %d, %s); attempt %d of %d failed, next in %.0f s",
                _where(self.url),
                error,
                claim.id,
                claim.event,
                attempts,
                max_attempts,
                delay,
            )
        else:
            values["next_attempt_at"] = now
            log.warning(
                "webhook %s: %s (delivery %d, %s); attempt %d of %d failed, given up: "
                "`edgefleet webhooks retry %d` sends it again",
                _where(self.url),
                error,
                claim.id,
                claim.event,
                attempts,
                max_attempts,
                claim.id,
            )
        with self.db.session() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == claim.id)
                .where(WebhookDelivery.next_attempt_at == claim.until)
                .values(**values)
                .execution_options(synchronize_session=False)
            )


def _due(now: dt.datetime, max_attempts: int) -> Any:
    """Deliveries to send now, oldest first: see the module docstring."""
    earlier = aliased(WebhookDelivery)
    held_back = exists().where(
        earlier.alert_id == WebhookDelivery.alert_id,
        earlier.id < WebhookDelivery.id,
        earlier.delivered_at.is_(None),
    )
    return (
        select(WebhookDelivery)
        .where(WebhookDelivery.delivered_at.is_(None))
        .where(WebhookDelivery.attempts < max_attempts)
        .where(WebhookDelivery.next_attempt_at <= now)
        .where(~held_back)
        .order_by(WebhookDelivery.id)
    )


def _where(url: str) -> str:
    """The webhook's scheme, host and port: its path or credentials may be secret."""
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


__all__ = ["BACKOFF", "LEASE_NAME", "DeliveryReport", "WebhookDeliverer"]
