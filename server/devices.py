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
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.mqtt.devicesig import is_valid_public_key
from edgefleet.mqtt.topics import DEVICE_ID_PATTERN
from edgefleet.semver import SEMVER_PATTERN
from edgefleet.server.audit import record_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    Device,
    Rollout,
    RolloutDevice,
)
from edgefleet.server.errors import ConflictError, EnrollmentError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts.machine import ACTIVE_STATES
from edgefleet.server.tags import MAX_TAGS, TagName, TagValue
from edgefleet.server.tokens import consume_enroll_token
from edgefleet.timefmt import utcnow

MAX_RUNTIMES = 16
RuntimeName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]


class EnrollRequest(BaseModel):
    """What a device sends to enroll (`POST /api/v1/devices/enroll`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    profile: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    arch: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
    runtimes: list[RuntimeName] = Field(default_factory=list, max_length=MAX_RUNTIMES)
    agent_version: Annotated[str, Field(max_length=64, pattern=SEMVER_PATTERN)]
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    enroll_token: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @field_validator("public_key")
    @classmethod
    def _usable_key(cls, value: str) -> str:
        if not is_valid_public_key(value):
            raise ValueError("not a usable Ed25519 public key (not on the curve, or small order)")
        return value

    @field_validator("runtimes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("runtimes repeat")
        return value


class HeartbeatSummary(BaseModel):
    """The health figures of a device's last heartbeat."""

    sent_at: str | None = None
    uptime_s: int | None = None
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    temperature_c: float | None = None

    @classmethod
    def from_heartbeat(cls, heartbeat: Mapping[str, Any] | None) -> HeartbeatSummary | None:
        """The summary of a stored heartbeat, or None when there is none or it is unusable."""
        if not isinstance(heartbeat, Mapping):
            return None
        try:
            return cls.model_validate({k: heartbeat.get(k) for k in cls.model_fields})
        except ValidationError:
            return None


class DevicePublic(BaseModel):
    """A device as the API shows it: inventory, what it serves, its health."""

    id: str
    online: bool
    model_name: str | None
    model_version: str | None
    previous_version: str | None
    install_state: str | None
    health: str
    last_seen: dt.datetime | None
    profile: str
    arch: str
    runtimes: list[str]
    agent_version: str
    tags: dict[str, str]
    enrolled_at: dt.datetime
    heartbeat: HeartbeatSummary | None
    # Per model name, the lowest release counter the device runs; None: not reported
    # (an agent that predates floors per name).
    security_floors: dict[str, int] | None

    @classmethod
    def from_row(cls, row: Device) -> DevicePublic:
        return cls(
            id=row.id,
            online=bool(row.online),
            model_name=row.model_name,
            model_version=row.model_version,
            previous_version=row.previous_version,
            install_state=row.install_state,
            health=row.health or "unknown",
            last_seen=row.last_seen,
            profile=row.profile,
            arch=row.arch,
            runtimes=[str(r) for r in row.runtimes or []],
            agent_version=row.agent_version,
            tags={str(k): str(v) for k, v in (row.tags or {}).items()},
            enrolled_at=row.enrolled_at,
            heartbeat=HeartbeatSummary.from_heartbeat(row.heartbeat),
            security_floors=_floors(row.security_floors),
        )


def _floors(stored: Any) -> dict[str, int] | None:
    """The stored floors as reported; None when there are none (or JSON null)."""
    if not isinstance(stored, Mapping):
        return None
    return {str(name): int(floor) for name, floor in stored.items()}


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
        consume_enroll_token(session, request.enroll_token, request.device_id, now)
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
    record_audit(session, _actor(device.id), "device.enroll", f"device {device.id}", details, now)
    return device, True


def _filters(
    online: bool | None, tags: Mapping[str, str] | None, model: str | None
) -> list[ColumnElement[bool]]:
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
        .where(*_filters(online, tags, model))
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
    query = select(func.count()).select_from(Device).where(*_filters(online, tags, model))
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
    rollout memberships (the last three by ON DELETE CASCADE). The id may then
    enroll again, with any key. Audited as "device.remove".

    Callers with a `DeviceKeyCache` invalidate it after the unit of work commits.

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
        raise ConflictError(
            f"device {device_id} is part of active rollout {named}; abort the rollout or "
            "wait until it ends, then remove the device"
        )
    details = {
        "public_key": device.public_key,
        "directive_sequence": device.directive_sequence,
        "enrolled_at": device.enrolled_at.isoformat(),
    }
    session.delete(device)
    session.flush()
    record_audit(session, actor, "device.remove", f"device {device_id}", details, now)


class DeviceKeyCache:
    """Enrolled public keys by device id, for the MQTT ingestion (thread-safe).

    Known keys are kept `ttl_s`, unknown ids `negative_ttl_s` (so a device
    enrolled through another replica is recognised soon), at most `max_entries`
    (least recently used dropped). `invalidate` after an enrollment or a removal
    on this replica; other replicas accept a removed device's key for up to
    `ttl_s` more (hence a short one: 10 s costs one indexed lookup per device
    per 10 s). A caller whose signature check failed may ask again with
    `fresh=True` (the device was removed and enrolled again with a new key,
    through another replica); that reloads at most once per
    `refresh_interval_s` per device, so forged messages cannot turn every
    message into a database query.
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = 10.0,
        negative_ttl_s: float = 5.0,
        refresh_interval_s: float = 5.0,
        max_entries: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._refresh_interval = refresh_interval_s
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # device id -> (key or None, loaded at)
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self.loads = 0  # database lookups made, for tests and metrics

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None:
        """The device's enrolled key (64 hex digits), None when it is not enrolled.

        Raises:
            StorageError: the database failed (nothing is cached).
        """
        now = self._monotonic()
        with self._lock:
            entry = self._entries.get(device_id)
            if entry is not None:
                key, loaded = entry
                age = now - loaded
                expired = age >= (self._ttl if key is not None else self._negative_ttl)
                if not expired and not (fresh and age >= self._refresh_interval):
                    self._entries.move_to_end(device_id)
                    return key
        key = self._load(device_id)
        with self._lock:
            self._entries[device_id] = (key, now)
            self._entries.move_to_end(device_id)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return key

    def _load(self, device_id: str) -> str | None:
        self.loads += 1
        with self._db.session() as session:
            return session.scalar(select(Device.public_key).where(Device.id == device_id))

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget `device_id`'s key (it was enrolled or removed), or every key (None)."""
        with self._lock:
            if device_id is None:
                self._entries.clear()
            else:
                self._entries.pop(device_id, None)


__all__ = [
    "DeviceKeyCache",
    "DevicePublic",
    "EnrollRequest",
    "HeartbeatSummary",
    "count_devices",
    "enroll_device",
    "get_device",
    "list_devices",
    "remove_device",
]
