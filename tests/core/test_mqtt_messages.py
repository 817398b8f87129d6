"""Device-to-server payloads: every malformed one is a MessageSchemaError, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet import errors
from edgefleet.mqtt import (
    MAX_MESSAGE_BYTES,
    BinCounts,
    DeviceTopics,
    Heartbeat,
    LatencyHistogram,
    Presence,
    StatusReport,
    TelemetryWindow,
    encode_message,
    parse_device_message,
    parse_message,
    parse_presence,
)

SENT = "2030-01-02T03:04:05Z"


def status(**overrides: Any) -> StatusReport:
    fields: dict[str, Any] = {
        "device_id": "cam-01",
        "sent_at": SENT,
        "sequence": 4,
        "install_state": "committed",
        "bundle_name": "demo",
        "bundle_version": "1.2.3",
        "previous_version": "1.2.2",
        "directive_sequence": 9,
    }
    fields.update(overrides)
    return StatusReport(**fields)


def heartbeat() -> Heartbeat:
    return Heartbeat(
        device_id="cam-01",
        sent_at=SENT,
        uptime_s=3600,
        cpu_percent=12.5,
        memory_used_bytes=100,
        memory_total_bytes=1000,
        disk_free_bytes=5,
        disk_total_bytes=10,
        temperature_c=48.0,
        agent_version="0.1.0",
        model_name="demo",
        model_version="1.2.3",
        install_state="idle",
    )


def telemetry() -> TelemetryWindow:
    bins = BinCounts(counts=[1, 2, 3], nan=0, below=1, above=0)
    return TelemetryWindow(
        device_id="cam-01",
        window_start="2030-01-02T03:00:00Z",
        window_end="2030-01-02T03:05:00Z",
        bundle_name="demo",
        bundle_version="1.2.3",
        requests=10,
        errors=1,
        fallbacks=0,
        schema_violations=0,
        latency=LatencyHistogram(bounds_ms=[1.0, 5.0, 25.0], counts=[2, 5, 2, 1]),
        inputs={"temperature": bins},
        outputs={"score": bins},
    )


def as_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(encode_message(message))
    return result


def payload(raw: Any) -> bytes:
    return json.dumps(raw).encode()


@pytest.mark.parametrize("message", [status(), heartbeat(), telemetry()])
def test_round_trip(message: Any) -> None:
    data = encode_message(message)
    assert json.loads(data)["schema_version"] == 1
    assert parse_message(type(message), data) == message


def test_malformed_json_refused() -> None:
    with pytest.raises(errors.MessageSchemaError, match="not valid JSON"):
        parse_message(StatusReport, b'{"device_id": ')


def test_non_utf8_refused() -> None:
    with pytest.raises(errors.MessageSchemaError):
        parse_message(StatusReport, b"\xff\xfe")


def test_integer_over_digit_limit_refused() -> None:
    # json.loads raises a bare ValueError past Python's int digit limit; it must not leak.
    data = encode_message(status()).replace(b'"sequence":4', b'"sequence":' + b"9" * 5000)
    with pytest.raises(errors.MessageSchemaError):
        parse_message(StatusReport, data)


def test_deeply_nested_json_refused() -> None:
    with pytest.raises(errors.MessageSchemaError):
        parse_message(StatusReport, b"[" * 100_000 + b"]" * 100_000)


def test_json_array_refused() -> None:
    with pytest.raises(errors.MessageSchemaError, match="not an object"):
        parse_message(StatusReport, b"[1, 2]")


def test_duplicate_keys_refused() -> None:
    data = encode_message(status())[:-1] + b',"sequence":5}'
    with pytest.raises(errors.MessageSchemaError, match="duplicate"):
        parse_message(StatusReport, data)


def test_oversized_message_refused() -> None:
    data = encode_message(status(reason="x" * 100))
    with pytest.raises(errors.MessageSchemaError, match="limit"):
        parse_message(StatusReport, data, max_bytes=len(data) - 1)
    with pytest.raises(errors.MessageSchemaError, match="limit"):
        parse_message(StatusReport, b" " * (MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sequence", "4"),  # a string where an int belongs
        ("sequence", True),
        ("sequence", 4.0),
        ("install_state", 3),
        ("sent_at", "yesterday"),
        ("sent_at", "2030-01-02T03:04:05+01:00"),
        ("device_id", "a/b"),
        ("device_id", "#"),
        ("bundle_version", "1.2"),
    ],
)
def test_wrong_types_refused(field: str, value: Any) -> None:
    raw = as_dict(status()) | {field: value}
    with pytest.raises(errors.MessageSchemaError, match=field):
        parse_message(StatusReport, payload(raw))


def test_negative_count_refused() -> None:
    raw = as_dict(telemetry())
    raw["inputs"]["temperature"]["counts"][1] = -1
    with pytest.raises(errors.MessageSchemaError, match=r"inputs\.temperature\.counts\.1"):
        parse_message(TelemetryWindow, payload(raw))
    raw = as_dict(telemetry()) | {"errors": -1}
    with pytest.raises(errors.MessageSchemaError, match="errors"):
        parse_message(TelemetryWindow, payload(raw))


def test_unknown_field_refused() -> None:
    raw = as_dict(heartbeat()) | {"gpu_percent": 3}
    with pytest.raises(errors.MessageSchemaError, match="gpu_percent"):
        parse_message(Heartbeat, payload(raw))


def test_unknown_nested_field_refused() -> None:
    raw = as_dict(telemetry())
    raw["outputs"]["score"]["mean"] = 1
    with pytest.raises(errors.MessageSchemaError, match="mean"):
        parse_message(TelemetryWindow, payload(raw))


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_wrong_schema_version_refused(version: Any) -> None:
    raw = as_dict(status()) | {"schema_version": version, "new_field": 1}
    with pytest.raises(errors.MessageSchemaError, match="schema_version"):
        parse_message(StatusReport, payload(raw))


def test_missing_schema_version_refused() -> None:
    raw = as_dict(status())
    del raw["schema_version"]
    with pytest.raises(errors.MessageSchemaError, match="no schema_version"):
        parse_message(StatusReport, payload(raw))


def test_histogram_counts_must_have_overflow_bucket() -> None:
    raw = as_dict(telemetry())
    raw["latency"]["counts"] = [2, 5, 2]
    with pytest.raises(errors.MessageSchemaError, match="overflow"):
        parse_message(TelemetryWindow, payload(raw))


def test_histogram_bounds_must_increase() -> None:
    raw = as_dict(telemetry())
    raw["latency"]["bounds_ms"] = [1.0, 25.0, 5.0]
    with pytest.raises(errors.MessageSchemaError, match="increasing"):
        parse_message(TelemetryWindow, payload(raw))


def test_nan_refused() -> None:
    data = encode_message(heartbeat()).replace(b'"cpu_percent":12.5', b'"cpu_percent":NaN')
    with pytest.raises(errors.MessageSchemaError):
        parse_message(Heartbeat, data)


def test_window_end_before_start_refused() -> None:
    raw = as_dict(telemetry()) | {"window_end": "2030-01-02T02:00:00Z"}
    with pytest.raises(errors.MessageSchemaError, match="window_end"):
        parse_message(TelemetryWindow, payload(raw))


def test_shadow_agreements_above_requests_refused() -> None:
    raw = as_dict(telemetry()) | {"shadow": {"requests": 3, "agreements": 4}}
    with pytest.raises(errors.MessageSchemaError, match="agreements"):
        parse_message(TelemetryWindow, payload(raw))


def test_heartbeat_memory_above_total_refused() -> None:
    raw = as_dict(heartbeat()) | {"memory_used_bytes": 2000}
    with pytest.raises(errors.MessageSchemaError, match="memory_used_bytes"):
        parse_message(Heartbeat, payload(raw))


def test_error_reason_is_one_line() -> None:
    raw = as_dict(telemetry()) | {"errors": -1, "requests": "x", "fallbacks": None}
    with pytest.raises(errors.MessageSchemaError) as caught:
        parse_message(TelemetryWindow, payload(raw))
    assert "\n" not in str(caught.value)
    assert "more" in str(caught.value)


def test_device_message_from_its_own_topic_accepted() -> None:
    topic = DeviceTopics("cam-01").status
    device_id, message = parse_device_message(topic, encode_message(status()))
    assert device_id == "cam-01"
    assert message == status()


def test_device_message_claiming_another_device_refused() -> None:
    topic = DeviceTopics("cam-02").status
    with pytest.raises(errors.MessageSchemaError, match="claims"):
        parse_device_message(topic, encode_message(status()))


def test_device_message_on_wrong_kind_refused() -> None:
    # A heartbeat published on the status topic does not match the status schema.
    with pytest.raises(errors.MessageSchemaError):
        parse_device_message(DeviceTopics("cam-01").status, encode_message(heartbeat()))
    with pytest.raises(errors.MessageSchemaError):
        parse_device_message(DeviceTopics("cam-01").directive, encode_message(status()))


def test_presence_payloads() -> None:
    assert parse_presence(Presence.OFFLINE.payload) is Presence.OFFLINE
    assert parse_presence(b"online") is Presence.ONLINE
    assert parse_presence(b"offline-clean") is Presence.OFFLINE_CLEAN
    with pytest.raises(errors.MessageSchemaError):
        parse_presence(b"ONLINE")


def test_heartbeat_reports_of_the_agent_are_optional_and_bounded() -> None:
    plain = encode_message(heartbeat())
    for name in ("link", "breakers", "trust_root_version", "frozen_out", "frozen_reason"):
        assert f'"{name}"'.encode() not in plain  # left out: older servers accept it
    reported = as_dict(heartbeat()) | {
        "link": {"connects": 1, "disconnects": 0, "publish_failures": 2, "outbox_depth": 0},
        "breakers": [{"step": "primary", "state": "half-open"}],
        "trust_root_version": 2,
        "frozen_out": True,
        "frozen_reason": "the newest fleet timestamp expired",
    }
    parsed = parse_message(Heartbeat, payload(reported))
    assert parsed.link is not None and parsed.link.publish_failures == 2
    assert parsed.breakers is not None and parsed.breakers[0].state == "half-open"
    for field, value in [
        ("breakers", [{"step": "primary", "state": "ajar"}]),
        ("breakers", [{"step": "primary", "state": "open"}] * 17),
        ("trust_root_version", 0),
        ("frozen_reason", "x" * 513),
        ("link", {"connects": 1}),
    ]:
        with pytest.raises(errors.MessageSchemaError, match=field):
            parse_message(Heartbeat, payload(reported | {field: value}))
