"""Fields by path: what a server announces it accepts, and an agent's payloads narrowed to it, so
that a server older than the agent takes the message rather than refuse it whole."""

from __future__ import annotations

import json
import logging
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from edgefleet.mqtt import (
    MESSAGE_TYPES,
    Heartbeat,
    LabelledCounts,
    Narrowing,
    ShadowCounts,
    TelemetryWindow,
    TopicKind,
    accepted_fields,
    encode_message,
    parse_message,
)
from edgefleet.mqtt.fieldsets import field_paths
from edgefleet.mqtt.messages import BreakerReport, DirectiveAnswer, LinkReport
from tests.core.test_mqtt_messages import heartbeat, telemetry


def full_heartbeat() -> Heartbeat:
    """A heartbeat with every optional part set."""
    return heartbeat().model_copy(
        update={
            "security_floors": {"demo": 3},
            "link": LinkReport(
                connects=2, disconnects=1, publish_failures=0, outbox_depth=4, last_problem="x"
            ),
            "breakers": [BreakerReport(step="primary", state="closed")],
            "answered": DirectiveAnswer(sequence=7, install_state="committed"),
        }
    )


def full_telemetry() -> TelemetryWindow:
    labelled = LabelledCounts(count=4, correct=0, abs_error=1.5, squared_error=0.75)
    return telemetry().model_copy(
        update={"labelled": labelled, "shadow": ShadowCounts(requests=3, agreements=2)}
    )


def older(model: type[BaseModel], without: set[str]) -> type[BaseModel]:
    """`model`'s schema as a server that predates the fields `without` has it (dotted paths
    one part deep), as strict about unknown fields as every device message is."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in without:
            continue
        nested = {path.split(".", 1)[1] for path in without if path.startswith(f"{name}.")}
        annotation: Any = info.annotation
        if nested:
            (part,) = [arg for arg in get_args(annotation) if arg is not type(None)]  # X | None
            annotation = older(part, nested) | None
        fields[name] = (annotation, info)
    config = ConfigDict(extra="forbid", strict=True)
    return create_model(f"Older{model.__name__}", __config__=config, **fields)


def announced(without: dict[str, set[str]]) -> dict[str, list[str]]:
    """What an older server announces: this version's paths, less `without` per kind."""
    return {
        kind: [path for path in paths if path not in without.get(kind, set())]
        for kind, paths in accepted_fields().items()
    }


def test_paths_reach_through_parts_lists_of_parts_and_mappings_of_parts() -> None:
    heartbeat_paths = field_paths(Heartbeat)
    assert heartbeat_paths["sent_at"] is True and heartbeat_paths["link"] is False
    assert heartbeat_paths["link.connects"] is True  # required in the part that holds it
    assert heartbeat_paths["link.last_problem"] is False
    assert heartbeat_paths["breakers.step"] is True  # the items of a list of parts
    assert "security_floors" in heartbeat_paths  # a mapping of counts: its keys are data
    assert not [path for path in heartbeat_paths if path.startswith("security_floors.")]
    telemetry_paths = field_paths(TelemetryWindow)
    assert {"inputs.*.counts", "outputs.*.nan", "labelled.abs_error"} <= set(telemetry_paths)
    assert accepted_fields() == {
        kind.value: sorted(field_paths(model)) for kind, model in MESSAGE_TYPES.items()
    }


def test_without_an_announcement_or_with_this_versions_the_bytes_go_out_as_they_are() -> None:
    narrowing = Narrowing()
    payload = encode_message(full_heartbeat())
    assert narrowing.narrow(TopicKind.HEARTBEAT, payload) is payload
    narrowing.accept(accepted_fields())
    assert narrowing.narrow(TopicKind.HEARTBEAT, payload) is payload
    narrowing.accept({"heartbeat": ["sent_at"]})  # another kind the announcement leaves out
    telemetry_payload = encode_message(full_telemetry())
    assert narrowing.narrow(TopicKind.TELEMETRY, telemetry_payload) is telemetry_payload


def test_a_heartbeat_narrowed_to_an_older_servers_fields_is_taken_where_the_whole_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    new_fields = {"answered", "answered.sequence", "answered.install_state"}
    new_fields |= {"answered.reason", "link.last_problem"}
    server = older(Heartbeat, {"answered", "link.last_problem"})
    whole = encode_message(full_heartbeat())
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        server.model_validate_json(whole)
    narrowing = Narrowing()
    narrowing.accept(announced({"heartbeat": new_fields}))
    with caplog.at_level(logging.INFO, logger="edgefleet.mqtt.fieldsets"):
        narrowed = narrowing.narrow(TopicKind.HEARTBEAT, whole)
        narrowing.narrow(TopicKind.HEARTBEAT, whole)
    server.model_validate_json(narrowed)
    expected = json.loads(whole)
    del expected["answered"], expected["link"]["last_problem"]
    assert json.loads(narrowed) == expected
    assert parse_message(Heartbeat, narrowed) == full_heartbeat().model_copy(
        update={
            "answered": None,
            "link": full_heartbeat().link.model_copy(  # type: ignore[union-attr]
                update={"last_problem": None}
            ),
        }
    )
    told = [record.getMessage() for record in caplog.records]
    assert told == [
        "the server does not accept heartbeat.answered, heartbeat.link.last_problem "
        "(it is older than this agent): left out"
    ]  # once, not at every heartbeat
    assert narrowing.left_out() == ["heartbeat.answered", "heartbeat.link.last_problem"]
    narrowing.accept(announced({"heartbeat": {"link.last_problem"}}))  # partly upgraded
    assert narrowing.left_out() == ["heartbeat.link.last_problem"]
    narrowing.accept(accepted_fields())  # upgraded
    assert narrowing.left_out() == []
    assert narrowing.narrow(TopicKind.HEARTBEAT, whole) is whole


def test_a_telemetry_window_keeps_what_an_older_server_knows_of_its_parts() -> None:
    regression = {"labelled.abs_error", "labelled.squared_error"}
    server = older(TelemetryWindow, regression)
    whole = encode_message(full_telemetry())
    with pytest.raises(ValidationError):
        server.model_validate_json(whole)
    narrowing = Narrowing()
    narrowing.accept(announced({"telemetry": regression}))
    narrowed = narrowing.narrow(TopicKind.TELEMETRY, whole)
    server.model_validate_json(narrowed)
    assert json.loads(narrowed)["labelled"] == {"count": 4, "correct": 0}
    assert json.loads(narrowed)["inputs"] == json.loads(whole)["inputs"]


def test_a_mapping_of_parts_is_narrowed_value_by_value() -> None:
    narrowing = Narrowing()
    narrowing.accept(announced({"telemetry": {"inputs.*.below", "inputs.*.above"}}))
    narrowed = json.loads(narrowing.narrow(TopicKind.TELEMETRY, encode_message(telemetry())))
    # `below` and `above` are required in a bin count: never left out; a server without
    # them refuses the window as it would have anyway (a new schema version's business).
    assert narrowed["inputs"] == {"temperature": {"counts": [1, 2, 3], "nan": 0, "below": 1,
                                                  "above": 0}}  # fmt: skip


def test_an_optional_part_that_grew_a_required_field_is_left_out_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server whose `link` part predates `outbox_depth`, required in this agent's.
    server = older(Heartbeat, {"link.outbox_depth"})
    whole = encode_message(full_heartbeat())
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        server.model_validate_json(whole)
    narrowing = Narrowing()
    narrowing.accept(announced({"heartbeat": {"link.outbox_depth"}}))
    with caplog.at_level(logging.INFO, logger="edgefleet.mqtt.fieldsets"):
        narrowed = narrowing.narrow(TopicKind.HEARTBEAT, whole)
    server.model_validate_json(narrowed)
    expected = json.loads(whole)
    del expected["link"]
    assert json.loads(narrowed) == expected
    assert narrowing.left_out() == ["heartbeat.link"]
    assert [record.getMessage() for record in caplog.records] == [
        "the server does not accept heartbeat.link (it is older than this agent): left out"
    ]
    narrowing.accept(announced({"heartbeat": {"link.outbox_depth"}}))  # the same, again
    assert narrowing.left_out() == ["heartbeat.link"]
    narrowing.accept(accepted_fields())
    assert narrowing.left_out() == []
    # Through a list of parts too.
    narrowing.accept(announced({"heartbeat": {"breakers.state"}}))
    assert "breakers" not in json.loads(narrowing.narrow(TopicKind.HEARTBEAT, whole))


def test_required_fields_are_never_left_out() -> None:
    narrowing = Narrowing()
    narrowing.accept({"heartbeat": ["device_id"]})  # a server that knows next to nothing
    narrowed = json.loads(narrowing.narrow(TopicKind.HEARTBEAT, encode_message(heartbeat())))
    required = {path for path, needed in field_paths(Heartbeat).items() if needed}
    required = {path for path in required if "." not in path}  # the parts here are unset
    assert required <= set(narrowed)
    assert "temperature_c" not in narrowed and "model_name" not in narrowed  # optional


def test_a_payload_that_is_no_json_object_goes_out_as_it_is() -> None:
    narrowing = Narrowing()
    narrowing.accept(announced({"heartbeat": {"answered"}}))
    for payload in (b"not json", b"[1, 2]"):
        assert narrowing.narrow(TopicKind.HEARTBEAT, payload) is payload
