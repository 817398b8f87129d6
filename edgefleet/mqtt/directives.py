"""Signed server-to-device documents: directives, the fleet timestamp and the fields the
server accepts.

A directive tells one device to install a bundle (named by digest and length,
with the transports to fetch it by), to roll back, to send its recent log
lines and status (`diagnostics`, answering with the request's id), or to
measure the candidates of a signed benchmark request (`benchmark`: the request
named as a bundle, fetched over HTTP, never installed; `edgefleet.benchwire`).
An agent older than an action refuses its directive as malformed and goes on. The fleet timestamp is
published retained to the whole fleet at a fixed period, so a device whose
newest timestamp has expired knows it is being frozen out (a stolen broker can
withhold messages, never forge them). Beside it, with the same sequence, the
server publishes the fields it accepts in each device message (`FleetAccepts`),
so that an agent newer than the server leaves out what the server would refuse
(`edgefleet.mqtt.fieldsets`).

Invariants, as in python-tuf's trusted metadata set:
- verification accepts only bytes and does no I/O; the caller persists the
  accepted sequence number (atomically) before acting on the document;
- checks run in a fixed order: size, envelope type, signatures by the trust
  root's `server` role over the exact signed bytes, schema, then the content
  checks (device, sequence, expiry), so nothing of an unsigned document is
  interpreted beyond what is needed to find its signatures;
- sequence numbers are per device and strictly increasing, which refuses both
  replays and out-of-order delivery;
- signed parts hold no floats (canonical JSON refuses them).

The trust root's own expiry is checked at every verification, as for bundles:
a long-running agent must notice when its trust root expires.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import (
    DirectiveExpiredError,
    DirectiveFromFutureError,
    FleetAcceptsError,
    FleetTimestampError,
    MalformedDocumentError,
    ReplayedDirectiveError,
    UntrustedInputError,
    UsageError,
    WrongDeviceError,
)
from edgefleet.keys import SigningKey
from edgefleet.mqtt._fields import BundleName, DeviceIdText, Version
from edgefleet.signing import Envelope, parse_envelope, sign_document
from edgefleet.timefmt import parse_time, utcnow
from edgefleet.trust import TrustRoot
from edgefleet.validation import Timestamp, describe_validation_error

DIRECTIVE_TYPE = "directive"
FLEET_TIMESTAMP_TYPE = "fleet-timestamp"
FLEET_ACCEPTS_TYPE = "fleet-accepts"
MAX_DIRECTIVE_BYTES = 64 * 1024
MAX_FLEET_TIMESTAMP_BYTES = 64 * 1024
MAX_FLEET_ACCEPTS_BYTES = 64 * 1024
MAX_ACCEPTED_KINDS = 16  # device message kinds in one announcement
MAX_ACCEPTED_PATHS = 1024  # field paths of one kind
# A document issued further ahead than this means a clock is badly wrong; a
# device whose clock runs far behind would otherwise honour expired documents.
MAX_CLOCK_SKEW = dt.timedelta(hours=1)
MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 128 * 1024  # a block plus framing stays under the message size limit


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BundleRef(_Model):
    """The bundle file to install, pinned by digest and length."""

    name: BundleName
    version: Version
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=1)


class HttpSource(_Model):
    transport: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)


class MqttBlocksSource(_Model):
    transport: Literal["mqtt-blocks"] = "mqtt-blocks"
    block_size: int = Field(ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE)


Source = Annotated[HttpSource | MqttBlocksSource, Field(discriminator="transport")]


class _Dated(_Model):
    issued: Timestamp
    expires: Timestamp

    @property
    def issued_at(self) -> dt.datetime:
        return parse_time(self.issued)

    @property
    def expires_at(self) -> dt.datetime:
        return parse_time(self.expires)

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        return (now or utcnow()) >= self.expires_at

    @model_validator(mode="after")
    def _expires_after_issued(self) -> _Dated:
        if parse_time(self.expires) <= parse_time(self.issued):
            raise ValueError("expires is not after issued")
        return self

    def to_signed(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class Directive(_Dated):
    """The signed part of a directive."""

    type_: Literal["directive"] = Field(default="directive", alias="_type")
    spec_version: Literal[1] = 1
    device_id: DeviceIdText
    sequence: int = Field(ge=1)
    action: Literal["install", "rollback", "diagnostics", "benchmark"]
    bundle: BundleRef | None = None
    sources: list[Source] = Field(default_factory=list, max_length=16)
    shadow: bool = False  # install beside the serving model and compare, do not serve
    # The server's diagnostics or benchmark request this directive asks the device to answer.
    request_id: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _action_consistent(self) -> Directive:
        if (self.action in ("diagnostics", "benchmark")) != (self.request_id is not None):
            raise ValueError(
                "a request_id comes with a diagnostics or benchmark directive, and only with one"
            )
        if self.action == "diagnostics":
            if self.bundle is not None or self.sources or self.shadow:
                raise ValueError("a diagnostics directive names no bundle, sources or shadow")
        elif self.action == "benchmark":
            # The bundle is the signed benchmark request (edgefleet.benchwire), never installed.
            if self.bundle is None or self.shadow:
                raise ValueError("a benchmark directive names its request as a bundle, no shadow")
            if not any(isinstance(source, HttpSource) for source in self.sources):
                raise ValueError("a benchmark directive lists an http source for its request")
        elif self.action == "install":
            if self.bundle is None:
                raise ValueError("an install directive must name a bundle")
            if not self.sources:
                raise ValueError("an install directive must list at least one source")
        elif self.sources:
            # A rollback returns to the version the device already holds.
            raise ValueError("a rollback directive takes no sources")
        return self

    def to_signed(self) -> dict[str, Any]:
        # Left out unless set, so install and rollback directives sign the same bytes as
        # before and agents that predate diagnostics accept them.
        return self.model_dump(
            by_alias=True, exclude={"request_id"} if self.request_id is None else None
        )


class _FleetDocument(_Dated):
    """A document published to the whole fleet, retained: each newer one a higher sequence."""

    sequence: int = Field(ge=1)


class FleetTimestamp(_FleetDocument):
    """The signed part of the fleet timestamp."""

    type_: Literal["fleet-timestamp"] = Field(default="fleet-timestamp", alias="_type")
    spec_version: Literal[1] = 1
    # The newest trust root version the server knows; above the device's, the device should
    # fetch the newer trust root.
    trust_root_version: int = Field(ge=1)


# A device message kind (a topic kind's value, e.g. "heartbeat") and a field path in it
# ("link.connects"; "features.*.counts" for a field of every value of a mapping).
AcceptedKind = Annotated[str, Field(pattern=r"^[a-z][a-z/_-]{0,31}$")]
_NAME = r"[a-z_][a-z0-9_]*"
FieldPath = Annotated[str, Field(max_length=256, pattern=rf"^{_NAME}(\.({_NAME}|\*))*$")]


class FleetAccepts(_FleetDocument):
    """The signed part of the server's announcement: per device message kind, the path of
    every field it accepts. Published with the fleet timestamp, under its sequence."""

    type_: Literal["fleet-accepts"] = Field(default="fleet-accepts", alias="_type")
    spec_version: Literal[1] = 1
    messages: Annotated[
        dict[AcceptedKind, Annotated[list[FieldPath], Field(max_length=MAX_ACCEPTED_PATHS)]],
        Field(max_length=MAX_ACCEPTED_KINDS),
    ]


_DatedT = TypeVar("_DatedT", bound=_Dated)
_FleetDocumentT = TypeVar("_FleetDocumentT", bound=_FleetDocument)


def _sign(document: _Dated, server_keys: Iterable[SigningKey]) -> bytes:
    keys = list(server_keys)
    if not keys:
        raise UsageError("no server key to sign with")
    return sign_document(document.to_signed(), keys).to_bytes()


def _verified_envelope(
    data: bytes, trust: TrustRoot, what: str, doc_type: str, max_bytes: int, now: dt.datetime
) -> Envelope:
    if not isinstance(data, (bytes, bytearray)):
        raise UsageError(f"{what} must be given as bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedDocumentError(f"{what} is {len(data)} bytes, above the {max_bytes} limit")
    trust.verify_not_expired(now)
    envelope = parse_envelope(bytes(data), what, doc_type)
    trust.verify_signed_by(envelope, "server")
    return envelope


def _validated(model_cls: type[_DatedT], envelope: Envelope, what: str) -> _DatedT:
    try:
        return model_cls.model_validate(envelope.signed)
    except ValidationError as exc:
        raise MalformedDocumentError(
            f"{what} is not valid: {describe_validation_error(exc)}"
        ) from exc


def _check_args(last_sequence: int, now: dt.datetime | None) -> dt.datetime:
    if type(last_sequence) is not int or last_sequence < 0:
        raise UsageError(f"last_sequence must be an int >= 0, got {last_sequence!r}")
    if now is not None and now.tzinfo is None:
        raise UsageError("now must be an aware datetime")
    return now or utcnow()


def sign_directive(directive: Directive, server_keys: Iterable[SigningKey]) -> bytes:
    """The bytes to publish on the device's directive topic.

    Raises:
        UsageError: no key given.
    """
    return _sign(directive, server_keys)


def verify_directive(
    data: bytes,
    trust: TrustRoot,
    *,
    device_id: str,
    last_sequence: int,
    now: dt.datetime | None = None,
) -> Directive:
    """Accept a directive for `device_id` whose sequence is above `last_sequence`, or raise.

    Raises:
        MalformedDocumentError: over the size limit, not a directive envelope, or
            a signed part that does not match the directive schema.
        UnknownKeyError, WrongRoleError, BadSignatureError, ThresholdError: not
            signed by the trust root's server role (see `TrustRoot.verify_signed_by`).
        WrongDeviceError: addressed to another device.
        ReplayedDirectiveError: sequence not above `last_sequence` (replayed or out of order).
        DirectiveExpiredError: past its expiry at `now`.
        DirectiveFromFutureError: issued more than `MAX_CLOCK_SKEW` after `now`.
        TrustRootExpiredError: `trust` has expired at `now`.
        UsageError: `data` is not bytes, or bad `last_sequence` or `now`.
    """
    moment = _check_args(last_sequence, now)
    envelope = _verified_envelope(
        data, trust, "directive", DIRECTIVE_TYPE, MAX_DIRECTIVE_BYTES, moment
    )
    directive = _validated(Directive, envelope, "directive")
    if directive.device_id != device_id:
        raise WrongDeviceError(
            f"directive {directive.sequence} is for device {directive.device_id!r}, "
            f"this is {device_id!r}"
        )
    if directive.sequence <= last_sequence:
        raise ReplayedDirectiveError(
            f"directive sequence {directive.sequence} is not above the last accepted "
            f"{last_sequence}: replayed or out of order"
        )
    if directive.is_expired(moment):
        raise DirectiveExpiredError(
            f"directive {directive.sequence} expired at {directive.expires} "
            f"(now {moment.isoformat()})"
        )
    if directive.issued_at > moment + MAX_CLOCK_SKEW:
        raise DirectiveFromFutureError(
            f"directive {directive.sequence} is issued at {directive.issued}, in the future "
            f"(now {moment.isoformat()}): the server's or this device's clock is wrong"
        )
    return directive


def sign_fleet_timestamp(timestamp: FleetTimestamp, server_keys: Iterable[SigningKey]) -> bytes:
    """The bytes to publish, retained, on the fleet timestamp topic.

    Raises:
        UsageError: no key given.
    """
    return _sign(timestamp, server_keys)


def verify_fleet_timestamp(
    data: bytes,
    trust: TrustRoot,
    *,
    last_sequence: int,
    now: dt.datetime | None = None,
) -> FleetTimestamp:
    """Accept a fleet timestamp newer than `last_sequence`, or raise.

    The topic is retained, so the broker redelivers the same timestamp on every
    reconnect; that one is refused as stale like any other. Callers compare the
    payload with the bytes they last accepted and skip it when equal (the case
    python-tuf tells apart as EqualVersionNumberError).

    Raises:
        MalformedDocumentError: over the size limit, not a fleet timestamp
            envelope, or a signed part that does not match the schema.
        UnknownKeyError, WrongRoleError, BadSignatureError, ThresholdError: not
            signed by the trust root's server role.
        FleetTimestampError: sequence not above `last_sequence`, expired at
            `now`, or issued more than `MAX_CLOCK_SKEW` after `now`.
        TrustRootExpiredError: `trust` has expired at `now`.
        UsageError: `data` is not bytes, or bad `last_sequence` or `now`.
    """
    return _verified_fleet_document(
        FleetTimestamp,
        data,
        trust,
        FLEET_TIMESTAMP_TYPE,
        MAX_FLEET_TIMESTAMP_BYTES,
        FleetTimestampError,
        last_sequence=last_sequence,
        now=now,
        expired_means=": this device may be frozen out",
    )


def sign_fleet_accepts(accepts: FleetAccepts, server_keys: Iterable[SigningKey]) -> bytes:
    """The bytes to publish, retained, on the fleet accepts topic.

    Raises:
        UsageError: no key given.
    """
    return _sign(accepts, server_keys)


def verify_fleet_accepts(
    data: bytes,
    trust: TrustRoot,
    *,
    last_sequence: int,
    now: dt.datetime | None = None,
) -> FleetAccepts:
    """Accept the server's announcement of the fields it accepts, newer than
    `last_sequence` and not expired at `now`, or raise.

    Raises:
        MalformedDocumentError: over the size limit, not a fleet accepts envelope, or
            a signed part that does not match the schema.
        UnknownKeyError, WrongRoleError, BadSignatureError, ThresholdError: not
            signed by the trust root's server role.
        FleetAcceptsError: sequence not above `last_sequence`, expired at `now`, or
            issued more than `MAX_CLOCK_SKEW` after `now`.
        TrustRootExpiredError: `trust` has expired at `now`.
        UsageError: `data` is not bytes, or bad `last_sequence` or `now`.
    """
    return _verified_fleet_document(
        FleetAccepts,
        data,
        trust,
        FLEET_ACCEPTS_TYPE,
        MAX_FLEET_ACCEPTS_BYTES,
        FleetAcceptsError,
        last_sequence=last_sequence,
        now=now,
    )


def _verified_fleet_document(
    model_cls: type[_FleetDocumentT],
    data: bytes,
    trust: TrustRoot,
    doc_type: str,
    max_bytes: int,
    error: type[UntrustedInputError],
    *,
    last_sequence: int,
    now: dt.datetime | None,
    expired_means: str = "",
) -> _FleetDocumentT:
    """A fleet document of `doc_type` above `last_sequence`, not expired at `now` and not
    issued ahead of it by more than `MAX_CLOCK_SKEW`, or raise (`error` for those three)."""
    moment = _check_args(last_sequence, now)
    what = doc_type.replace("-", " ")
    envelope = _verified_envelope(data, trust, what, doc_type, max_bytes, moment)
    document = _validated(model_cls, envelope, what)
    if document.sequence <= last_sequence:
        raise error(
            f"{what} sequence {document.sequence} is not above the last accepted "
            f"{last_sequence}: stale"
        )
    if document.is_expired(moment):
        raise error(
            f"{what} {document.sequence} expired at {document.expires} "
            f"(now {moment.isoformat()}){expired_means}"
        )
    if document.issued_at > moment + MAX_CLOCK_SKEW:
        raise error(
            f"{what} {document.sequence} is issued at {document.issued}, in the future "
            f"(now {moment.isoformat()}): the server's or this device's clock is wrong"
        )
    return document
