"""Device-to-server MQTT payloads: versioned, strict schemas and their one byte form.

Invariants: every message carries `schema_version` (1 here) and is refused when
it claims another; unknown fields are refused (a newer sender must bump the
version, not slip fields past an older server); types are strict (no "5" for
5, no true for 1); counts are non-negative and fit a signed 64-bit integer; no
string holds a NUL character (a database cannot store one: PostgreSQL refuses it
in text and JSON alike), refused by `parse_message` and replaced by U+FFFD in
what `encode_message` produces, so what a sender encodes is what a receiver
accepts. `parse_message` is the only way
untrusted payload bytes become a message, and it raises `MessageSchemaError`
with a one-line reason and nothing else, so a receiver can count and report a
bad payload without crashing. The schemas carry no signature: on the wire a
device wraps each message in a frame signed with its enrolled key
(`edgefleet.mqtt.devicesig`), which binds it to its topic, and the receiver
verifies the frame before parsing what it holds; that is why
`parse_device_message` checks the payload's device id against the topic's.
"""

from __future__ import annotations

import enum
import itertools
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.canonical import parse_json
from edgefleet.errors import MalformedDocumentError, MessageSchemaError, UsageError
from edgefleet.mqtt._fields import BundleName, Count, DeviceIdText, Ordinal, Version
from edgefleet.mqtt.topics import DeviceId, TopicKind, parse_device_topic
from edgefleet.timefmt import parse_time
from edgefleet.validation import Timestamp, describe_validation_error

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
MAX_SECURITY_FLOORS = 1024  # model names with a floor, in one heartbeat
MAX_BREAKERS = 16  # fallback steps reported in one heartbeat
MAX_PROBLEM_CHARS = 512  # a problem described in words (link, frozen out)
# A diagnostics answer: at most this many log lines, of at most this many characters
# each and this many bytes (UTF-8) together; the whole answer at most MAX_DIAGNOSTICS_BYTES.
MAX_LOG_LINES = 200
MAX_LOG_LINE_CHARS = 1024
MAX_LOG_BYTES = 64 * 1024
MAX_DIAGNOSTICS_BYTES = 128 * 1024

Finite = Annotated[float, Field(allow_inf_nan=False)]
# Install states belong to the agent's state machine (plus `refused`, the report of a
# refusal that changed nothing); the schema only keeps them tame.
InstallState = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
FeatureName = Annotated[str, Field(min_length=1, max_length=128)]


class Message(BaseModel):
    """Base of every device-to-server message."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    what: ClassVar[str] = "message"

    schema_version: Literal[1] = 1
    device_id: DeviceIdText


class StatusReport(Message):
    """Where the device's install state machine is, sent on every transition."""

    what: ClassVar[str] = "status report"

    sent_at: Timestamp
    sequence: Count  # per device, so the server can order reports and drop duplicates
    install_state: InstallState
    bundle_name: BundleName | None = None
    bundle_version: Version | None = None
    previous_version: Version | None = None
    reason: Annotated[str, Field(max_length=2048)] | None = None
    directive_sequence: Ordinal | None = None
    # Set while the device's newest fleet timestamp has expired (it may be frozen out);
    # left out of the bytes otherwise, so a server older than the field takes the rest.
    frozen_reason: Annotated[str, Field(max_length=MAX_PROBLEM_CHARS)] | None = None


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


ProblemText = Annotated[str, Field(max_length=MAX_PROBLEM_CHARS)]


class LinkReport(_Part):
    """The agent's MQTT link counters since it started (agent/link.py `LinkCounters`)."""

    connects: Count
    disconnects: Count  # connections lost (not counting a clean stop)
    publish_failures: Count  # heartbeats skipped and messages the broker rejected
    outbox_depth: Count  # status reports and telemetry waiting to be sent
    last_problem: ProblemText | None = None


class BreakerReport(_Part):
    """One step of the device's fallback chain and the state of its circuit breaker."""

    step: Annotated[str, Field(min_length=1, max_length=64)]  # primary | float | previous
    state: Literal["closed", "open", "half-open"]


class DirectiveAnswer(_Part):
    """The last directive the agent answered and how: what its last status report of that
    directive said (`committed`, `failed` or `refused`, and the reason)."""

    sequence: Ordinal  # the directive's sequence
    install_state: InstallState
    reason: Annotated[str, Field(max_length=2048)] | None = None


class Heartbeat(Message):
    """Periodic health of the device and its agent."""

    what: ClassVar[str] = "heartbeat"

    sent_at: Timestamp
    uptime_s: Count
    cpu_percent: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    memory_used_bytes: Count
    memory_total_bytes: Count
    disk_free_bytes: Count
    disk_total_bytes: Count
    temperature_c: Finite | None = None
    agent_version: Version
    model_name: BundleName | None = None
    model_version: Version | None = None
    install_state: InstallState
    # Per model name, the lowest release counter the device runs (its security floors).
    # Optional: agents that predate it do not send it, and the server keeps what it had.
    security_floors: (
        Annotated[dict[BundleName, Count], Field(max_length=MAX_SECURITY_FLOORS)] | None
    ) = None
    # Optional, left out when unused, so servers that predate them accept the rest:
    link: LinkReport | None = None
    breakers: Annotated[list[BreakerReport], Field(max_length=MAX_BREAKERS)] | None = None
    trust_root_version: Ordinal | None = None
    # The newest fleet timestamp expired and no newer one arrived: updates may be withheld.
    frozen_out: bool | None = None
    frozen_reason: ProblemText | None = None
    # Restates the answer to the last directive, so a lost status report is settled.
    answered: DirectiveAnswer | None = None

    @model_validator(mode="after")
    def _within_totals(self) -> Heartbeat:
        if self.memory_used_bytes > self.memory_total_bytes:
            raise ValueError("memory_used_bytes is above memory_total_bytes")
        if self.disk_free_bytes > self.disk_total_bytes:
            raise ValueError("disk_free_bytes is above disk_total_bytes")
        return self


class LatencyHistogram(_Part):
    """Request latencies: `counts[i]` at or below `bounds_ms[i]`, the last count above all."""

    bounds_ms: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    counts: list[Count]

    @model_validator(mode="after")
    def _shape(self) -> LatencyHistogram:
        if any(b >= a for b, a in itertools.pairwise(self.bounds_ms)):
            raise ValueError("bounds_ms must be strictly increasing")
        if len(self.counts) != len(self.bounds_ms) + 1:
            raise ValueError(
                f"counts has {len(self.counts)} entries, expected one per bound plus overflow "
                f"({len(self.bounds_ms) + 1})"
            )
        return self


class BinCounts(_Part):
    """Values counted into the bundle's reference bins, plus what fell outside them."""

    counts: list[Count]
    nan: Count
    below: Count
    above: Count


class ShadowCounts(_Part):
    requests: Count
    agreements: Count

    @model_validator(mode="after")
    def _agreements_bounded(self) -> ShadowCounts:
        if self.agreements > self.requests:
            raise ValueError("agreements is above requests")
        return self


NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LabelledCounts(_Part):
    """Feedback on the window's answers: `count` labelled, `correct` of the class labels right.

    Regression feedback (a number, not a class) adds to `count` and to the sums
    `abs_error` and `squared_error` of its errors. Those two are optional and left
    out of the bytes when absent (`encode_message` omits None), so a window without
    regression feedback reads exactly as before, to servers of either age.
    """

    count: Count
    correct: Count
    abs_error: NonNegativeFinite | None = None
    squared_error: NonNegativeFinite | None = None

    @model_validator(mode="after")
    def _correct_bounded(self) -> LabelledCounts:
        if self.correct > self.count:
            raise ValueError("correct is above count")
        if (self.abs_error is None) != (self.squared_error is None):
            raise ValueError("abs_error and squared_error come together")
        return self


class TelemetryWindow(Message):
    """Compact counts over one time window; raw inputs never leave the device."""

    what: ClassVar[str] = "telemetry window"

    window_start: Timestamp
    window_end: Timestamp
    bundle_name: BundleName
    bundle_version: Version
    requests: Count
    errors: Count
    fallbacks: Count
    schema_violations: Count
    latency: LatencyHistogram
    inputs: dict[FeatureName, BinCounts]
    outputs: dict[FeatureName, BinCounts]
    shadow: ShadowCounts | None = None
    labelled: LabelledCounts | None = None
    dropped_windows: Count = 0  # windows lost to a full buffer since the last one sent

    @model_validator(mode="after")
    def _window_ordered(self) -> TelemetryWindow:
        if parse_time(self.window_end) <= parse_time(self.window_start):
            raise ValueError("window_end is not after window_start")
        return self


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class LogLine(_Part):
    """One record of the agent's log: when, how severe, from where, what."""

    at: Timestamp
    level: LogLevel
    logger: Annotated[str, Field(max_length=128)]
    message: Annotated[str, Field(max_length=MAX_LOG_LINE_CHARS)]


class DiagnosticsReport(Message):
    """A device's answer to a diagnostics directive: its recent log lines and its status.

    `status` is what `agent status --json` shows (versions, fallback chain and
    breakers, install and drift state, link counters, disk and memory); its
    shape belongs to the agent, so it is an object here, bounded by the size of
    the whole answer (`MAX_DIAGNOSTICS_BYTES`, which the receiver passes to
    `parse_message`).
    """

    what: ClassVar[str] = "diagnostics answer"

    sent_at: Timestamp
    request_id: Ordinal
    directive_sequence: Ordinal
    log_lines: Annotated[list[LogLine], Field(max_length=MAX_LOG_LINES)]
    status: dict[str, Any]

    @model_validator(mode="after")
    def _log_bounded(self) -> DiagnosticsReport:
        total = sum(len(line.message.encode("utf-8")) for line in self.log_lines)
        if total > MAX_LOG_BYTES:
            raise ValueError(f"log lines hold {total} bytes, above the {MAX_LOG_BYTES} limit")
        return self


class Presence(str, enum.Enum):
    """The retained payload on a device's presence topic: OFFLINE is its Last Will (the
    connection was lost), OFFLINE_CLEAN what it publishes before disconnecting cleanly."""

    ONLINE = "online"
    OFFLINE = "offline"
    OFFLINE_CLEAN = "offline-clean"

    @property
    def payload(self) -> bytes:
        return self.value.encode("ascii")


MessageT = TypeVar("MessageT", bound=Message)

# Which schema each reported topic kind carries: what the agent's link publishes and the
# server ingests. Block requests, the other device message, are parsed by
# `edgefleet.mqtt.blocks.parse_block_request` and answered by the block service.
MESSAGE_TYPES: dict[TopicKind, type[Message]] = {
    TopicKind.STATUS: StatusReport,
    TopicKind.HEARTBEAT: Heartbeat,
    TopicKind.TELEMETRY: TelemetryWindow,
    TopicKind.DIAGNOSTICS: DiagnosticsReport,
}


NUL = "\x00"
NUL_REPLACEMENT = "\ufffd"


def _nul_path(value: Any, path: str) -> str | None:
    """The path of the first string (a key or a value) in `value` that holds a NUL."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if NUL in key:
                return f"{path}.{key!r}"
            found = _nul_path(item, f"{path}.{key}")
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _without_nul(value: Any) -> Any:
    """`value` with every NUL in its strings (keys and values) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace(NUL, NUL_REPLACEMENT)
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def encode_message(message: Message) -> bytes:
    """The JSON bytes to publish for `message` (a NUL in a string replaced by U+FFFD).

    Raises:
        UsageError: `message` is not an edgefleet message.
    """
    if not isinstance(message, Message):
        raise UsageError(f"{type(message).__name__} is not an edgefleet MQTT message")
    # Fields left at None are left out: an optional field added later is then absent,
    # not null, in every message that does not use it, and older receivers accept it.
    text = message.model_dump_json(exclude_none=True)
    if "\\u0000" in text:  # a NUL, escaped (or an escaped backslash before "u0000")
        data = _without_nul(message.model_dump(mode="json", exclude_none=True))
        text = type(message).model_validate(data).model_dump_json(exclude_none=True)
    return text.encode("utf-8")


def parse_message(
    model_cls: type[MessageT], payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES
) -> MessageT:
    """Parse untrusted payload bytes into a message of `model_cls`.

    Raises:
        MessageSchemaError: too large, not JSON, another schema version, a string
            holding a NUL, or a schema violation (the reason names the field).
    """
    what = model_cls.what
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageSchemaError(f"{what} payload is a {type(payload).__name__}, not bytes")
    if len(payload) > max_bytes:
        raise MessageSchemaError(f"{what} is {len(payload)} bytes, above the {max_bytes} limit")
    try:
        raw: Any = parse_json(bytes(payload), what)
    except MalformedDocumentError as exc:
        raise MessageSchemaError(str(exc)) from exc
    except ValueError as exc:
        # parse_json lets through the ValueError of an integer over Python's digit limit.
        raise MessageSchemaError(f"{what} is not acceptable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MessageSchemaError(f"{what} is a JSON {type(raw).__name__}, not an object")
    # Checked before the schema so a newer sender gets a precise reason, not a list
    # of fields this version does not know.
    if "schema_version" not in raw:
        raise MessageSchemaError(f"{what} has no schema_version")
    found = raw["schema_version"]
    if type(found) is not int or found != SCHEMA_VERSION:
        raise MessageSchemaError(
            f"{what} has schema_version {found!r}; this side understands {SCHEMA_VERSION}"
        )
    # JSON carries a NUL only escaped: the walk runs only when the escape is in the bytes.
    nul_at = _nul_path(raw, "payload") if b"\\u0000" in payload else None
    if nul_at is not None:
        raise MessageSchemaError(
            f"{what} does not match its schema: field {nul_at} holds a NUL character"
        )
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise MessageSchemaError(
            f"{what} does not match its schema: field {describe_validation_error(exc, 'payload')}"
        ) from exc


def parse_device_message(
    topic: str, payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[DeviceId, Message]:
    """Parse a message received on a device's status, heartbeat, telemetry or diagnostics
    topic.

    Raises:
        MessageSchemaError: a foreign topic, a kind that carries no message
            schema, a bad payload, or a payload naming another device than its
            topic (a device may publish only in its own subtree, so the topic is
            what the broker vouched for).
    """
    device_id, kind = parse_device_topic(topic)
    model_cls = MESSAGE_TYPES.get(kind)
    if model_cls is None:
        raise MessageSchemaError(f"topic {topic!r} does not carry a device message")
    message = parse_message(model_cls, payload, max_bytes)
    if message.device_id != device_id:
        raise MessageSchemaError(
            f"{model_cls.what} on the topic of device {device_id!r} claims to come from "
            f"device {message.device_id!r}"
        )
    return device_id, message


def parse_presence(payload: bytes) -> Presence:
    """Raises: MessageSchemaError when `payload` is not a `Presence` value."""
    for presence in Presence:
        if payload == presence.payload:
            return presence
    raise MessageSchemaError(
        f"presence payload {bytes(payload[:32])!r} is not online, offline or offline-clean"
    )
