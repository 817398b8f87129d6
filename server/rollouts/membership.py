"""One active rollout per device: which devices are taken, and the lock that keeps it so.

A device takes part in at most one active (running, paused, aborting)
rollout. Rows in state `skipped` record devices a rollout left out because
another had them; they do not make the device part of that rollout.

No database constraint spans rollouts, so every path that adds devices to a
rollout (a start, a stage beginning, the driver's late joiners and skipped
devices joining) first takes the membership lock, then reads which devices
are free: of two such paths at the same moment, the second waits until the
first commits and then sees its devices.
"""

from __future__ import annotations

from sqlalchemy import ScalarSelect, SQLColumnExpression, func, select
from sqlalchemy.orm import Session, aliased

from edgefleet.server.db.models import DeviceState, Rollout, RolloutDevice
from edgefleet.server.leases import next_counter
from edgefleet.server.rollouts.machine import ACTIVE_STATES

MEMBERSHIP_LOCK = "rollout-membership"  # the counter whose row lock serialises membership


def lock_membership(session: Session) -> None:
    """Hold the rollout membership lock until the caller's unit of work ends.

    An increment of the counter `rollout-membership`: on PostgreSQL its row
    stays locked until commit (see leases.py), and on SQLite the write takes
    the database's write lock, held as long. A second start, stage or late
    joiner waits there, and its later statements (PostgreSQL's READ COMMITTED:
    each reads what was committed when it began) see the first one's devices.
    Take it before reading which devices are free. Taking it twice in one
    unit of work is harmless.

    Raises:
        StorageError: the database is neither SQLite nor PostgreSQL.
    """
    next_counter(session, MEMBERSHIP_LOCK)


def busy_devices(session: Session, rollout_id: int | None = None) -> dict[str, int]:
    """Devices taking part in an active rollout other than `rollout_id`, with its id.

    A device skipped by a rollout is not part of it.
    """
    query = (
        select(RolloutDevice.device_id, func.min(RolloutDevice.rollout_id))
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.state.in_(ACTIVE_STATES), RolloutDevice.state != DeviceState.SKIPPED)
        .group_by(RolloutDevice.device_id)
    )
    if rollout_id is not None:
        query = query.where(RolloutDevice.rollout_id != rollout_id)
    return {device_id: int(other) for device_id, other in session.execute(query).all()}


def other_rollout_of(device_id: SQLColumnExpression[str], rollout_id: int) -> ScalarSelect[int]:
    """SQL: the id of another active rollout `device_id` takes part in, or NULL.

    The correlated form of `busy_devices`, for filtering in a query.
    """
    other = aliased(RolloutDevice)
    return (
        select(func.min(other.rollout_id))
        .join(Rollout, Rollout.id == other.rollout_id)
        .where(
            other.device_id == device_id,
            other.rollout_id != rollout_id,
            other.state != DeviceState.SKIPPED,
            Rollout.state.in_(ACTIVE_STATES),
        )
        .scalar_subquery()
    )


def skipped_reason(other_rollout_id: int) -> str:
    """The reason recorded on a device left out because `other_rollout_id` has it."""
    return f"in active rollout {other_rollout_id}; joins when that one ends"


__all__ = [
    "MEMBERSHIP_LOCK",
    "busy_devices",
    "lock_membership",
    "other_rollout_of",
    "skipped_reason",
]
