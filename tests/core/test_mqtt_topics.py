"""Topics: built in one place, parsed strictly, never a wildcard by accident."""

from __future__ import annotations

import pytest

from edgefleet import errors
from edgefleet.mqtt import (
    FLEET_TIMESTAMP_TOPIC,
    DeviceId,
    DeviceTopics,
    Direction,
    TopicKind,
    device_filter,
    device_topic,
    fleet_timestamp_topic,
    is_valid_device_id,
    parse_device_topic,
    server_filters,
    shared_filter,
)


def test_device_topics_built_under_namespace() -> None:
    topics = DeviceTopics("cam-01")
    assert topics.directive == "edgefleet/v1/devices/cam-01/directive"
    assert topics.status == "edgefleet/v1/devices/cam-01/status"
    assert topics.heartbeat == "edgefleet/v1/devices/cam-01/heartbeat"
    assert topics.telemetry == "edgefleet/v1/devices/cam-01/telemetry"
    assert topics.presence == "edgefleet/v1/devices/cam-01/presence"
    assert topics.blocks_request == "edgefleet/v1/devices/cam-01/blocks/request"
    assert topics.blocks_data == "edgefleet/v1/devices/cam-01/blocks/data"
    assert topics.subtree == "edgefleet/v1/devices/cam-01/#"
    assert fleet_timestamp_topic() == FLEET_TIMESTAMP_TOPIC == "edgefleet/v1/fleet/timestamp"


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_built_topic_parses_back(kind: TopicKind) -> None:
    device_id, parsed = parse_device_topic(device_topic("a.b_c-9", kind))
    assert (device_id, parsed) == ("a.b_c-9", kind)
    assert isinstance(device_id, DeviceId)


@pytest.mark.parametrize(
    "bad_id", ["a/b", "+", "a+b", "#", "a#", "", "-lead", ".hidden", "$SYS", "a b", "é", "x" * 129]
)
def test_device_id_with_topic_metacharacters_refused(bad_id: str) -> None:
    assert not is_valid_device_id(bad_id)
    with pytest.raises(errors.UsageError):
        DeviceId(bad_id)
    with pytest.raises(errors.UsageError):
        device_topic(bad_id, TopicKind.STATUS)
    with pytest.raises(errors.UsageError):
        DeviceTopics(bad_id)


def test_longest_device_id_accepted() -> None:
    assert DeviceId("x" * 128) == "x" * 128


def test_server_filters_cover_device_to_server_kinds() -> None:
    assert device_filter(TopicKind.TELEMETRY) == "edgefleet/v1/devices/+/telemetry"
    assert sorted(server_filters()) == sorted(
        f"edgefleet/v1/devices/+/{kind}"
        for kind in (
            "status",
            "heartbeat",
            "telemetry",
            "presence",
            "blocks/request",
            "diagnostics",
        )
    )


def test_shared_subscription_form() -> None:
    topic_filter = device_filter(TopicKind.TELEMETRY)
    shared = shared_filter("servers", topic_filter)
    assert shared == "$share/servers/edgefleet/v1/devices/+/telemetry"


@pytest.mark.parametrize("group", ["", "a/b", "+", "#", "$share"])
def test_shared_subscription_bad_group_refused(group: str) -> None:
    with pytest.raises(errors.UsageError):
        shared_filter(group, device_filter(TopicKind.STATUS))


def test_shared_subscription_not_nested() -> None:
    with pytest.raises(errors.UsageError):
        shared_filter("g", shared_filter("g", device_filter(TopicKind.STATUS)))


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v2/devices/cam-01/status",  # another version
        "other/v1/devices/cam-01/status",
        "edgefleet/v1/fleet/timestamp",  # not per-device
        "edgefleet/v1/devices/cam-01",  # no kind
        "edgefleet/v1/devices/cam-01/",
        "edgefleet/v1/devices//status",
        "edgefleet/v1/devices/+/status",  # a filter, not a topic
        "edgefleet/v1/devices/cam-01/#",
        "edgefleet/v1/devices/cam-01/unknown",
        "edgefleet/v1/devices/cam-01/blocks",
        "edgefleet/v1/devices/cam-01/status/extra",
        "$share/g/edgefleet/v1/devices/cam-01/status",
        "/edgefleet/v1/devices/cam-01/status",
    ],
)
def test_foreign_topic_refused(topic: str) -> None:
    with pytest.raises(errors.MessageSchemaError):
        parse_device_topic(topic)


def test_kind_directions_and_delivery() -> None:
    to_device = {kind for kind in TopicKind if kind.direction is Direction.TO_DEVICE}
    assert to_device == {TopicKind.DIRECTIVE, TopicKind.BLOCKS_DATA}
    assert TopicKind.DIRECTIVE.qos == 1
    assert TopicKind.STATUS.qos == 1
    assert TopicKind.PRESENCE.retained
    assert not TopicKind.DIRECTIVE.retained
