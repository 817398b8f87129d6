"""MQTT topics: the only place in edgefleet where a topic string is built or taken apart.

Layout (namespace `edgefleet/v1`, versioned so that a v2 can run beside it):

    edgefleet/v1/devices/{device_id}/directive       server -> device, signed directives
    edgefleet/v1/devices/{device_id}/status          device -> server
    edgefleet/v1/devices/{device_id}/heartbeat       device -> server
    edgefleet/v1/devices/{device_id}/telemetry       device -> server
    edgefleet/v1/devices/{device_id}/presence        device -> server, Last Will, retained
    edgefleet/v1/devices/{device_id}/blocks/request  device -> server, MQTT block transfer
    edgefleet/v1/devices/{device_id}/blocks/data     server -> device, MQTT block transfer
    edgefleet/v1/devices/{device_id}/diagnostics     device -> server, the answer to a
                                                     diagnostics directive
    edgefleet/v1/fleet/timestamp                     server -> all, signed, retained
    edgefleet/v1/fleet/accepts                       server -> all, the fields it accepts in
                                                     device messages, signed, retained
    edgefleet/v1/fleet/trust-root/{version}          server -> all, every trust root version
                                                     after 1, signed by root keys, retained

Invariants: a `DeviceId` is exactly one topic level and never holds `/`, `+`,
`#` or a leading `$`, so a built topic names one device and can never act as a
wildcard; `parse_device_topic` accepts only topics of the layout above. The
per-device subtree is what broker ACLs grant to one device's certificate.
"""

from __future__ import annotations

import enum
import re

from edgefleet.errors import MessageSchemaError, UsageError

NAMESPACE = "edgefleet/v1"
DEVICES_PREFIX = f"{NAMESPACE}/devices"
FLEET_TIMESTAMP_TOPIC = f"{NAMESPACE}/fleet/timestamp"
FLEET_ACCEPTS_TOPIC = f"{NAMESPACE}/fleet/accepts"
TRUST_ROOT_PREFIX = f"{NAMESPACE}/fleet/trust-root"
# Every version stays retained under its own topic, so a device that slept through
# several rotations receives each one it lacks on connect and walks N -> N+1.
TRUST_ROOT_FILTER = f"{TRUST_ROOT_PREFIX}/+"
TRUST_ROOT_QOS = 1

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
# Shared-subscription group names are one topic level too (MQTT 5, 4.8.2).
_SHARE_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Direction(enum.Enum):
    TO_DEVICE = "to-device"
    FROM_DEVICE = "from-device"


class TopicKind(str, enum.Enum):
    """The last level(s) of a per-device topic."""

    DIRECTIVE = "directive"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    TELEMETRY = "telemetry"
    PRESENCE = "presence"
    BLOCKS_REQUEST = "blocks/request"
    BLOCKS_DATA = "blocks/data"
    DIAGNOSTICS = "diagnostics"

    @property
    def direction(self) -> Direction:
        if self in (TopicKind.DIRECTIVE, TopicKind.BLOCKS_DATA):
            return Direction.TO_DEVICE
        return Direction.FROM_DEVICE

    @property
    def qos(self) -> int:
        """QoS to publish and subscribe with.

        Directives, status, telemetry and diagnostics answers at QoS 1 so that a
        persistent session delivers them after an outage; heartbeats are superseded by the next one
        and block data is re-requested by bitmap, so QoS 0 is enough for those.
        """
        if self in (TopicKind.HEARTBEAT, TopicKind.BLOCKS_DATA):
            return 0
        return 1

    @property
    def retained(self) -> bool:
        # Presence is retained so a server that (re)starts sees every device's last state.
        return self is TopicKind.PRESENCE


# The fleet timestamp is retained so a device that connects gets the newest one at once.
FLEET_TIMESTAMP_QOS = 1
FLEET_TIMESTAMP_RETAINED = True

_KINDS_BY_VALUE = {kind.value: kind for kind in TopicKind}


def is_valid_device_id(text: str) -> bool:
    """True when `text` may be used as a device id (one safe topic level)."""
    return isinstance(text, str) and _DEVICE_ID.fullmatch(text) is not None


class DeviceId(str):
    """A device id that is safe as exactly one topic level.

    Construct it from trusted configuration; for ids that arrive from outside,
    check with `is_valid_device_id` or `parse_device_topic` first.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> DeviceId:
        """Raises: UsageError when `value` is not a valid device id."""
        if not is_valid_device_id(value):
            raise UsageError(
                f"device id {value!r} is not valid: 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return super().__new__(cls, value)


def device_topic(device_id: str, kind: TopicKind) -> str:
    """The topic of `kind` in the subtree of `device_id`.

    Raises:
        UsageError: `device_id` is not a valid device id.
    """
    return f"{DEVICES_PREFIX}/{DeviceId(device_id)}/{TopicKind(kind).value}"


class DeviceTopics:
    """Every topic of one device, for its agent or for the server talking to it."""

    __slots__ = ("device_id",)

    def __init__(self, device_id: str) -> None:
        """Raises: UsageError when `device_id` is not a valid device id."""
        self.device_id = DeviceId(device_id)

    def __repr__(self) -> str:
        return f"DeviceTopics({str(self.device_id)!r})"

    def topic(self, kind: TopicKind) -> str:
        return device_topic(self.device_id, kind)

    @property
    def subtree(self) -> str:
        """Filter for the whole subtree of this device (for broker ACLs)."""
        return f"{DEVICES_PREFIX}/{self.device_id}/#"

    @property
    def directive(self) -> str:
        return self.topic(TopicKind.DIRECTIVE)

    @property
    def status(self) -> str:
        return self.topic(TopicKind.STATUS)

    @property
    def heartbeat(self) -> str:
        return self.topic(TopicKind.HEARTBEAT)

    @property
    def telemetry(self) -> str:
        return self.topic(TopicKind.TELEMETRY)

    @property
    def presence(self) -> str:
        return self.topic(TopicKind.PRESENCE)

    @property
    def blocks_request(self) -> str:
        return self.topic(TopicKind.BLOCKS_REQUEST)

    @property
    def blocks_data(self) -> str:
        return self.topic(TopicKind.BLOCKS_DATA)

    @property
    def diagnostics(self) -> str:
        return self.topic(TopicKind.DIAGNOSTICS)


def fleet_timestamp_topic() -> str:
    return FLEET_TIMESTAMP_TOPIC


def fleet_accepts_topic() -> str:
    """Published as the fleet timestamp is (`FLEET_TIMESTAMP_QOS`, retained)."""
    return FLEET_ACCEPTS_TOPIC


def trust_root_topic(version: int) -> str:
    """The retained topic of trust root `version` (>= 1)."""
    if type(version) is not int or version < 1:
        raise UsageError(f"trust root version {version!r} is not a positive integer")
    return f"{TRUST_ROOT_PREFIX}/{version}"


def parse_trust_root_topic(topic: str) -> int:
    """The version a trust-root topic names.

    Raises:
        MessageSchemaError: not a trust-root topic, or its last level is not a version.
    """
    prefix = TRUST_ROOT_PREFIX + "/"
    text = topic[len(prefix) :] if isinstance(topic, str) and topic.startswith(prefix) else ""
    if not (text.isascii() and text.isdigit()) or text.startswith("0") or len(text) > 9:
        raise MessageSchemaError(f"topic {topic!r} is not {prefix}VERSION")
    return int(text)


def device_filter(kind: TopicKind) -> str:
    """Subscription filter for `kind` from every device, e.g. `edgefleet/v1/devices/+/status`."""
    return f"{DEVICES_PREFIX}/+/{TopicKind(kind).value}"


def shared_filter(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared-subscription form `$share/{group}/{filter}`.

    Server replicas subscribing with the same group share the messages: each
    message goes to one of them.

    Raises:
        UsageError: `group` is not a plain name, or `topic_filter` is already shared.
    """
    if not isinstance(group, str) or not _SHARE_GROUP.fullmatch(group):
        raise UsageError(
            f"share group {group!r} is not valid: 1-64 letters, digits, '.', '_' or '-'"
        )
    if topic_filter.startswith("$share/"):
        raise UsageError(f"{topic_filter!r} is already a shared subscription")
    return f"$share/{group}/{topic_filter}"


def server_filters() -> list[str]:
    """Filters for everything devices publish, one per device-to-server kind."""
    return [device_filter(kind) for kind in TopicKind if kind.direction is Direction.FROM_DEVICE]


def parse_device_topic(topic: str) -> tuple[DeviceId, TopicKind]:
    """Split a received per-device topic into its device id and kind.

    Raises:
        MessageSchemaError: the topic is not a per-device topic of this namespace
            (another namespace or version, a bad device id, an unknown kind).
    """
    prefix = DEVICES_PREFIX + "/"
    if not isinstance(topic, str) or not topic.startswith(prefix):
        raise MessageSchemaError(f"topic {topic!r} is not under {prefix}")
    device_id, sep, kind_text = topic[len(prefix) :].partition("/")
    if not sep:
        raise MessageSchemaError(f"topic {topic!r} names no message kind after the device id")
    if not is_valid_device_id(device_id):
        raise MessageSchemaError(f"topic {topic!r} holds an invalid device id {device_id!r}")
    kind = _KINDS_BY_VALUE.get(kind_text)
    if kind is None:
        raise MessageSchemaError(f"topic {topic!r} has unknown kind {kind_text!r}")
    return DeviceId(device_id), kind
