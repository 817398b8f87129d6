"""Leases and counters shared by server replicas, decided by the database.

A lease names a piece of work only one replica may do at a time (driving
rollout 7, publishing the fleet timestamp). A replica holds it until
`expires_at`; it renews by acquiring again before then. Once the holder stops
renewing (it crashed, or lost the database) another replica takes over after
at most one TTL.

Both operations are single statements, so they are atomic on SQLite and on
PostgreSQL without reading first:

- acquiring is `INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE owner = me OR
  expires_at < now`: it inserts a new lease, renews our own, or takes over an
  expired one, and touches nothing otherwise (no row returned: someone else
  holds it).
  On PostgreSQL the row stays locked until the caller's unit of work ends, so
  a concurrent acquirer waits and then sees the winner's row.
- a counter is `INSERT (name, 1) ... ON CONFLICT DO UPDATE SET value = value + 1
  RETURNING value`.

Both take effect when the caller's unit of work commits: acquire, commit, then
do the work (or do the work in the same unit of work). Clocks of replicas
should agree to well under the TTL; the `now` of the acquirer decides expiry.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet.server.db.models import Counter, Lease
from edgefleet.server.errors import StorageError
from edgefleet.timefmt import utcnow


def _insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT (both have ON CONFLICT; the generic one has not)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise StorageError(f"leases and counters need SQLite or PostgreSQL, not {dialect}")


def acquire_lease(
    session: Session, name: str, owner: str, ttl: dt.timedelta, now: dt.datetime | None = None
) -> bool:
    """Take or renew lease `name` for `owner` until now + ttl; True when `owner` holds it.

    False means another owner holds an unexpired lease; nothing was changed.

    Raises:
        ValueError: `ttl` is not positive.
        StorageError: the database is neither SQLite nor PostgreSQL.
        sqlalchemy errors propagate to the unit of work (`Database.session`
            translates them to StorageError).
    """
    if ttl <= dt.timedelta(0):
        raise ValueError(f"lease TTL must be positive, not {ttl}")
    now = now or utcnow()
    stmt = _insert(session, Lease).values(name=name, owner=owner, expires_at=now + ttl)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Lease.name],
        set_={"owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at},
        where=or_(Lease.owner == owner, Lease.expires_at < now),
    ).returning(Lease.owner)
    # A row comes back when it was inserted or updated (rowcount is not
    # reliable for INSERT ... ON CONFLICT across drivers).
    return session.execute(stmt).first() is not None


def release_lease(session: Session, name: str, owner: str) -> bool:
    """Give up lease `name` if `owner` holds it (expired or not); True when released.

    Raises:
        sqlalchemy errors propagate to the unit of work.
    """
    result = session.execute(delete(Lease).where(Lease.name == name, Lease.owner == owner))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def lease_holder(session: Session, name: str, now: dt.datetime | None = None) -> str | None:
    """Who holds lease `name` now (None: nobody, or the lease expired).

    Raises:
        sqlalchemy errors propagate to the unit of work.
    """
    now = now or utcnow()
    return session.scalar(select(Lease.owner).where(Lease.name == name, Lease.expires_at >= now))


def next_counter(session: Session, name: str) -> int:
    """Increment counter `name` and return its new value (1 the first time).

    Two replicas never get the same value: the increment is one statement and
    the row stays locked until the caller's unit of work ends.

    Raises:
        StorageError: the database is neither SQLite nor PostgreSQL.
        sqlalchemy errors propagate to the unit of work.
    """
    stmt = _insert(session, Counter).values(name=name, value=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Counter.name], set_={"value": Counter.value + 1}
    ).returning(Counter.value)
    value = session.execute(stmt).scalar_one()
    return int(value)


__all__ = ["acquire_lease", "lease_holder", "next_counter", "release_lease"]
