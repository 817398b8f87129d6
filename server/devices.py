"""Devices: enrollment (which key speaks for which device id) and the inventory.

Enrollment binds a device id to an Ed25519 public key; from then on the MQTT
ingestion accepts from that id only messages the key signed
(`edgefleet.mqtt.devicesig`, keys looked up through `DeviceKeyCache`). The
rules, in `enroll_device`:

- a new device needs a one-time enrollment token (consumed in the same unit of
  work), or the server must run with open enrollment; the token's tags are
  merged over the tags the device asked for (the operator's word wins);
- enrolling an enrolled id again with the SAME key changes nothing and
  consumes no token: an agent that lost the answer may simply retry. The
  request is not signed, so anyone who knows a device's (public) key could
  send it; that is why it may change nothing;
- enrolling an enrolled id with a DIFFERENT key is refused, token or not:
  enrollment binds an id to a key once. Enrollment tokens are not bound to a
  device id, so a token that could re-key would let any token holder take over
  any device. A re-flashed device (a new key) enrolls again only after an
  operator removed the old one (`remove_device`, `edgefleet devices remove
  ID`): a human decides that the new key is the same device.
New enrollments are audited as "device.enroll", removals as "device.remove".
Removing a device deletes its status reports, telemetry buckets and rollout
memberships with it (ON DELETE CASCADE), and is refused while the device is part
of an active rollout.

The inventory queries (`list_devices`, `count_devices`) are one SQL statement
each, ordered by the primary key, so a page of a 10,000-device fleet costs
milliseconds on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.server.api.schemas.enroll import EnrollRequest
from edgefleet.server.audit import record_audit
from edgefleet.server.certificates import revoke_device_certificates
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    AuditEntry,
    Device,
    Rollout,
    RolloutDevice,
)
from edgefleet.server.errors import ConflictError, EnrollmentError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts.machine import ACTIVE_STATES, RolloutState
from edgefleet.server.tokens import count_enroll_token_use, find_enroll_token
from edgefleet.timefmt import utcnow

KEY_CHANGES = ("device.enroll", "device.remove")  # the audit actions that change a device's key
COMMIT_ALLOWANCE_S = 60.0  # how long after its audit row's id was drawn a change surely committed


def _audit_target(device_id: str) -> str:
    return f"device {device_id}"


def _actor(device_id: str) -> Principal:
    # The audit log names who did it: here the device itself (it holds no API role).
    return Principal(f"device:{device_id}", Role.VIEWER)


def first_directive_sequence(now: dt.datetime) -> int:
    """Where a newly enrolled device's directive numbers start: milliseconds since 1970.

    An id removed and enrolled again may belong to an agent that kept its state and
    refuses every directive numbered at or below the last it accepted; numbering
    from the enrollment time stays above anything the earlier enrollment issued
    (fewer than one directive per millisecond), without remembering removed ids.
    """
    return int(now.timestamp() * 1000)


def enroll_device(
    session: Session,
    request: EnrollRequest,
    *,
    open_enrollment: bool,
    now: dt.datetime | None = None,
) -> tuple[Device, bool]:
    """Enroll `request.device_id` with `request.public_key` (see the module docstring).

    Returns the device row and whether it was created (False: it was enrolled
    with this key already).

    Raises:
        EnrollmentError: the id is enrolled with another key (an operator must
            remove the device first); no token and no open enrollment; or the
            token is unknown, used or expired.
        ConflictError: another request enrolled the same new id at the same moment.
    """
    now = now or utcnow()
    device = session.get(Device, request.device_id, with_for_update=True)
    if device is not None:
        if device.public_key == request.public_key:
            return device, False  # idempotent: nothing changes, no token is consumed
        # No token, not even a fresh one, re-keys: tokens are not bound to a device
        # id, so a token that could re-key would hand any token holder any device.
        raise EnrollmentError(
            f"device {request.device_id} is enrolled with another key; if this is the same "
            "device with a new key (re-flashed), an operator removes the old enrollment "
            f"first (`edgefleet devices remove {request.device_id}`), then the device "
            "enrolls again"
        )
    if request.enroll_token is None and not open_enrollment:
        raise EnrollmentError(
            "this server enrolls devices with an enrollment token only "
            "(an operator makes one with `edgefleet devices enroll-token`)"
        )
    token = (
        find_enroll_token(session, request.enroll_token, now)
        if request.enroll_token is not None
        else None
    )
    token_tags = {str(k): str(v) for k, v in (token.tags if token else {}).items()}
    details: dict[str, Any] = {
        "public_key": request.public_key,
        "token": token.id if token else None,
        "token_created_by": token.created_by if token else None,
    }
    device = Device(
        id=request.device_id,
        public_key=request.public_key,
        enrolled_at=now,
        profile=request.profile,
        arch=request.arch,
        runtimes=list(request.runtimes),
        agent_version=request.agent_version,
        tags={**request.tags, **token_tags},
        online=False,
        health="unknown",
        status_sequence=0,
        directive_sequence=first_directive_sequence(now),
    )
    session.add(device)
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(
            f"device {request.device_id} was enrolled by another request at the same "
            "moment; try again"
        ) from exc
    record_audit(
        session, _actor(device.id), "device.enroll", _audit_target(device.id), details, now
    )
    if token is not None:
        # Last, so that devices enrolling with the same token wait for its row the least.
        count_enroll_token_use(session, token, device.id, now)
    return device, True


def device_filters(
    online: bool | None, tags: Mapping[str, str] | None, model: str | None
) -> list[ColumnElement[bool]]:
    """The WHERE conditions of `list_devices` (the pages add their own to them)."""
    conditions: list[ColumnElement[bool]] = []
    if online is not None:
        conditions.append(Device.online.is_(online))
    for name, value in (tags or {}).items():
        conditions.append(Device.tags[name].as_string() == value)
    if model:
        # "name" or "name@version"
        name, _, version = model.partition("@")
        conditions.append(Device.model_name == name)
        if version:
            conditions.append(Device.model_version == version)
    return conditions


def list_devices(
    session: Session,
    *,
    online: bool | None = None,
    tags: Mapping[str, str] | None = None,
    model: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Device]:
    """Devices ordered by id: `online` state, every tag in `tags`, serving `model`
    ("name" or "name@version"); `limit` from `offset`."""
    query = (
        select(Device)
        .where(*device_filters(online, tags, model))
        .order_by(Device.id)
        .limit(max(0, limit))
        .offset(max(0, offset))
    )
    return list(session.scalars(query))


def count_devices(
    session: Session,
    *,
    online: bool | None = None,
    tags: Mapping[str, str] | None = None,
    model: str | None = None,
) -> int:
    """How many devices `list_devices` would page through with these filters."""
    query = select(func.count()).select_from(Device).where(*device_filters(online, tags, model))
    return int(session.scalar(query) or 0)


def get_device(session: Session, device_id: str) -> Device:
    """Raises: NotFoundError when no device has that id."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


def remove_device(
    session: Session, device_id: str, actor: Principal, now: dt.datetime | None = None
) -> None:
    """Forget `device_id`: its key, inventory, status reports, telemetry buckets and
    rollout memberships (the last three by ON DELETE CASCADE), and revoke its client
    certificates. The id may then enroll again, with any key. Audited as "device.remove".

    Callers with a `DeviceKeyCache` invalidate it after the unit of work commits, and
    refresh the CRL file (`CrlFile`).

    Raises:
        NotFoundError: no device has that id.
        ConflictError: the device is part of a running, paused or aborting rollout
            (its gates count it; abort the rollout or wait for it to end).
    """
    now = now or utcnow()
    # Locked (PostgreSQL): a driver assigning the device to a stage meanwhile waits,
    # then fails on the foreign key and tries again at its next tick.
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    active = session.execute(
        select(Rollout.id, Rollout.state)
        .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(
            RolloutDevice.device_id == device_id,
            Rollout.state.in_([state.value for state in ACTIVE_STATES]),
        )
        .order_by(Rollout.id)
    ).all()
    if active:
        named = ", ".join(f"{rollout_id} ({state})" for rollout_id, state in active)
        if all(state == RolloutState.ABORTING.value for _, state in active):
            what = "wait until the abort has rolled its devices back"
        else:
            what = "abort the rollout or wait until it ends"
        raise ConflictError(
            f"device {device_id} is part of active rollout {named}; {what}, then remove the device"
        )
    details = {
        "public_key": device.public_key,
        "directive_sequence": device.directive_sequence,
        "enrolled_at": device.enrolled_at.isoformat(),
    }
    session.delete(device)
    session.flush()
    details["revoked_certificates"] = revoke_device_certificates(session, device_id, now)
    record_audit(session, actor, "device.remove", _audit_target(device_id), details, now)


class DeviceKeyCache:
    """Enrolled public keys by device id, for the MQTT ingestion (thread-safe).

    A known key is kept until something changes it; an unknown id for
    `negative_ttl_s` (so a device enrolled without an audit entry is still
    recognised soon); at most `max_entries` (least recently used dropped).
    Changes are found with one query every `check_interval_s` for the whole
    cache: the enrollments and removals audited since the last check
    ("device.enroll", "device.remove", written in the same unit of work as the
    change), each of which drops that device's entry. So another replica's
    removal is noticed within `check_interval_s`; `invalidate` after an
    enrollment or a removal on this replica forgets at once. Audit entries are
    read again for `COMMIT_ALLOWANCE_S` after they were first seen, so an entry
    whose id was drawn before one already seen, but committed after it
    (PostgreSQL), is not missed.

    A caller whose signature check failed may ask again with `fresh=True` (the
    device was removed and enrolled again with a new key, through another
    replica, since the last check); that reloads at most once per
    `refresh_interval_s` per device, so forged messages cannot turn every
    message into a database query.
    """

    def __init__(
        self,
        db: Database,
        *,
        check_interval_s: float = 5.0,
        negative_ttl_s: float = 5.0,
        refresh_interval_s: float = 5.0,
        max_entries: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._check_interval = check_interval_s
        self._negative_ttl = negative_ttl_s
        self._refresh_interval = refresh_interval_s
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        # device id -> (key or None, loaded at)
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._generation = 0  # invalidations so far: a load that raced one is not kept
        self._checked_at: float | None = None
        self._audit_floor = 0  # audit ids at or below it are settled and were read
        self._audit_seen: dict[int, float] = {}  # audit ids above the floor -> first seen at
        self.loads = 0  # key lookups made, for tests and metrics
        self.checks = 0  # change queries made, for tests and metrics

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None:
        """The device's enrolled key (64 hex digits), None when it is not enrolled.

        Raises:
            StorageError: the database failed (nothing is cached).
        """
        now = self._monotonic()
        self._check_for_changes(now)
        with self._lock:
            generation = self._generation
            entry = self._entries.get(device_id)
            if entry is not None:
                key, loaded = entry
                age = now - loaded
                expired = key is None and age >= self._negative_ttl
                if not expired and not (fresh and age >= self._refresh_interval):
                    self._entries.move_to_end(device_id)
                    return key
        key = self._load(device_id)
        with self._lock:
            if generation != self._generation:  # invalidated meanwhile: the key may be stale
                return key
            self._entries[device_id] = (key, now)
            self._entries.move_to_end(device_id)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return key

    def _load(self, device_id: str) -> str | None:
        self.loads += 1
        with self._db.session() as session:
            return session.scalar(select(Device.public_key).where(Device.id == device_id))

    def _check_for_changes(self, now: float) -> None:
        """Every `check_interval_s`: drop the entries of devices enrolled or removed since."""
        with self._check_lock:
            if self._checked_at is not None and now - self._checked_at < self._check_interval:
                return
            self.checks += 1
            with self._db.session() as session:
                if self._checked_at is None:  # the cache is empty: only later changes matter
                    self._audit_floor = session.scalar(select(func.max(AuditEntry.id))) or 0
                    self._checked_at = now
                    return
                changes = session.execute(
                    select(AuditEntry.id, AuditEntry.target).where(
                        AuditEntry.id > self._audit_floor, AuditEntry.action.in_(KEY_CHANGES)
                    )
                ).all()
            for audit_id, target in changes:
                if audit_id not in self._audit_seen:
                    self._audit_seen[audit_id] = now
                    self.invalidate(target.removeprefix(_audit_target("")))
            settled = [
                i for i, seen in self._audit_seen.items() if now - seen >= COMMIT_ALLOWANCE_S
            ]
            if settled:
                self._audit_floor = max(settled)
                self._audit_seen = {
                    i: seen for i, seen in self._audit_seen.items() if i > self._audit_floor
                }
            self._checked_at = now

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget `device_id`'s key (it was enrolled or removed), or every key (None)."""
        with self._lock:
            self._generation += 1
            if device_id is None:
                self._entries.clear()
            else:
                self._entries.pop(device_id, None)


__all__ = [
    "DeviceKeyCache",
    "count_devices",
    "device_filters",
    "enroll_device",
    "get_device",
    "list_devices",
    "remove_device",
]
