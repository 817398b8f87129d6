"""Rollout plans: parsing, defaults, refusal of impossible plans, stage membership."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import tracemalloc

import pytest

from edgefleet.plantext import MAX_PLAN_BYTES
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.rollouts.plan import (
    GateOverrides,
    Gates,
    Plan,
    Stage,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    stage_targets,
)

SMALLEST = "stages: [{percent: 34}, {percent: 100}]"


def test_smallest_plan_gets_every_default() -> None:
    plan = load_plan(SMALLEST)
    assert [s.percent for s in plan.stages] == [34.0, 100.0]
    assert plan.rate_limit_per_minute == 600
    assert plan.device_timeout_s == 1800
    assert plan.max_retries == 2
    assert plan.on_gate_failure == "abort"
    assert plan.gates == Gates()
    assert plan.gates.min_success_share == 0.9
    assert plan.gates.max_failure_share == 0.1
    assert plan.gates.min_reporting == 0
    assert plan.gates.bake_s == 60
    assert plan.gates.max_error_rate == 0.05
    assert plan.gates.max_fallback_rate == 0.05
    assert plan.gates.max_latency_p95_ratio == 1.5
    assert plan.gates.min_shadow_agreement == 0.95
    assert plan.gates.min_requests == 20
    assert plan.stage_name(0) == "stage 1"


def test_json_text_is_read_like_yaml() -> None:
    text = json.dumps({"stages": [{"count": 2, "name": "canary"}, {"percent": 100}]})
    plan = load_plan(text)
    assert plan.stages[0].count == 2
    assert plan.stage_name(0) == "canary"
    assert plan.stage_name(1) == "stage 2"


def test_stage_gates_merge_overrides_over_plan_gates() -> None:
    plan = load_plan(
        """
        gates: {bake_s: 120, max_error_rate: 0.02}
        stages:
          - {devices: [cam-1, cam-2], gates: {bake_s: 600, min_reporting: 2}}
          - {percent: 100}
        """
    )
    first, last = plan.stage_gates(0), plan.stage_gates(1)
    assert (first.bake_s, first.min_reporting, first.max_error_rate) == (600, 2, 0.02)
    assert (last.bake_s, last.min_reporting, last.max_error_rate) == (120, 0, 0.02)


def test_overrides_carry_the_bounds_of_the_gates_they_replace() -> None:
    # stage_gates merges without validating again; this keeps that safe.
    assert set(GateOverrides.model_fields) == set(Gates.model_fields)
    for name, gate in Gates.model_fields.items():
        assert GateOverrides.model_fields[name].metadata == gate.metadata, name


def test_plan_round_trips_through_its_stored_form() -> None:
    plan = load_plan(
        """
        on_gate_failure: pause
        max_retries: 0
        stages:
          - {name: canaries, devices: [a], shadow: true, gates: {min_shadow_agreement: 0.99}}
          - {count: 3}
          - {percent: 100}
        """
    )
    stored = plan_to_dict(plan)
    assert json.loads(json.dumps(stored)) == stored  # JSON-safe
    assert stored["stages"][0] == {
        "name": "canaries",
        "devices": ["a"],
        "shadow": True,
        "gates": {"min_shadow_agreement": 0.99},
    }
    assert stored["stages"][1] == {"count": 3, "shadow": False}
    assert stored["gates"]["bake_s"] == 60  # defaults are filled in
    assert stored["gates"]["max_drift"] is None  # off unless set
    assert plan_from_dict(stored) == plan
    assert plan_to_dict(plan_from_dict(stored)) == stored


def test_plan_can_be_built_in_code() -> None:
    plan = Plan(stages=[Stage(count=1), Stage(percent=100)], on_gate_failure="pause")
    assert plan_from_dict(plan_to_dict(plan)) == plan


IMPOSSIBLE = [
    # (plan text, words the one-line message must hold)
    ("stages: [{percent: 50}]", ["stages.0", "{percent: 100}", "not implied"]),
    ("stages: [{count: 5}]", ["stages.0", "{percent: 100}"]),
    ("stages: [{percent: 50}, {percent: 40}, {percent: 100}]", ["stages.1.percent", "40", "50"]),
    ("stages: [{percent: 50}, {percent: 50}, {percent: 100}]", ["stages.1.percent"]),
    ("stages: [{count: 5}, {count: 5}, {percent: 100}]", ["stages.1.count", "5"]),
    ("stages: [{devices: [a, b, c]}, {count: 3}, {percent: 100}]", ["stages.1.count", "3"]),
    ("stages: [{percent: 100}, {percent: 100}]", ["stages.1", "100% stage"]),
    ("stages: [{percent: 100}, {count: 9}, {percent: 100}]", ["stages.1", "100% stage"]),
    ("stages: [{percent: 10}, {percent: 100, shadow: true}]", ["stages.1", "shadow"]),
    ("stages: [{devices: [a, b]}, {devices: [b]}, {percent: 100}]", ["stages.1.devices", "'b'"]),
    ("stages: [{devices: [a, a]}, {percent: 100}]", ["stages.0.devices", "'a'", "twice"]),
    ("stages: [{name: x, count: 1}, {name: x, percent: 100}]", ["stages.1.name", "'x'"]),
    ("stages: [{count: 1, percent: 10}, {percent: 100}]", ["stages.0", "exactly one"]),
    ("stages: [{shadow: true}, {percent: 100}]", ["stages.0", "exactly one", "none"]),
    ("stages: [{devices: []}, {percent: 100}]", ["stages.0.devices"]),
    ("stages: [{devices: ['']}, {percent: 100}]", ["stages.0.devices.0"]),
    ("stages: [{count: 0}, {percent: 100}]", ["stages.0.count"]),
    ("stages: [{count: 1.5}, {percent: 100}]", ["stages.0.count"]),
    ("stages: [{count: true}, {percent: 100}]", ["stages.0.count"]),
    ("stages: [{count: '3'}, {percent: 100}]", ["stages.0.count"]),
    ("stages: [{percent: 0}, {percent: 100}]", ["stages.0.percent"]),
    ("stages: [{percent: 100.5}]", ["stages.0.percent"]),
    ("stages: []", ["stages"]),
    ("stages: [" + ", ".join(["{percent: 100}"] * 21) + "]", ["stages"]),
    ("{stages: [{percent: 100}], gates: {min_success_share: 1.5}}", ["min_success_share"]),
    ("{stages: [{percent: 100}], gates: {min_success_share: 0}}", ["min_success_share"]),
    ("{stages: [{percent: 100}], gates: {max_failure_share: -0.1}}", ["max_failure_share"]),
    ("{stages: [{percent: 100}], gates: {min_requests: 0}}", ["min_requests"]),
    ("{stages: [{percent: 100}], gates: {bake: 5}}", ["gates.bake"]),
    ("stages: [{percent: 100, gates: {min_success_share: 2}}]", ["stages.0.gates"]),
    ("stages: [{percent: 100, colour: red}]", ["stages.0.colour"]),
    ("{stages: [{percent: 100}], rate_limit_per_minute: 0}", ["rate_limit_per_minute"]),
    ("{stages: [{percent: 100}], max_retries: -1}", ["max_retries"]),
    ("{stages: [{percent: 100}], on_gate_failure: ignore}", ["on_gate_failure"]),
    ("{stages: [{percent: 100}], surprise: 1}", ["surprise"]),
    ("stages: {percent: 100}", ["stages"]),
    ("[1, 2]", ["mapping"]),
    ("just text", ["mapping"]),
    ("", ["mapping"]),
    ("stages: [{percent: 100}", ["YAML or JSON", "line"]),
    ('{"stages": [', ["YAML or JSON"]),
]


@pytest.mark.parametrize(("text", "words"), IMPOSSIBLE)
def test_impossible_plan_is_refused_naming_the_field(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        load_plan(text)
    message = str(caught.value)
    assert message.startswith("invalid plan: ")
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_oversized_plan_text_is_refused_before_parsing() -> None:
    text = "stages: [{percent: 100}]\n#" + "x" * MAX_PLAN_BYTES
    with pytest.raises(InvalidRequestError, match="longer than"):
        load_plan(text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("stages: [{percent: .inf}]", "stages.0.percent: inf is not a finite number"),
        ("stages: [{percent: 100}]\ngates: {bake_s: .nan}", "gates.bake_s: nan is not a finite"),
        (
            "stages: [{percent: 100}]\ngates: {max_latency_p95_ratio: 1.0e+999}",
            "gates.max_latency_p95_ratio: inf is not",
        ),
        ("stages: [{percent: 100, name: 2026-01-01}]", "stages.0.name: a date is not plan data"),
    ],
)
def test_numbers_that_are_not_finite_and_yaml_only_values_are_refused(
    text: str, where: str
) -> None:
    with pytest.raises(InvalidRequestError, match=f"^invalid plan: {re.escape(where)}"):
        load_plan(text)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"stages": [{"percent": math.inf}]}, "stages.0.percent"),
        (
            {"stages": [{"percent": 100}], "gates": {"max_latency_p95_ratio": math.inf}},
            "gates.max_latency_p95_ratio",
        ),
        ({"stages": [{"percent": 100, "gates": {"bake_s": math.nan}}]}, "stages.0.gates.bake_s"),
    ],
)
def test_a_json_body_with_infinite_numbers_is_refused_naming_the_field(
    raw: dict[str, object], field: str
) -> None:
    # The API's JSON parser accepts Infinity and NaN: the plan's own fields refuse them.
    with pytest.raises(InvalidRequestError, match=f"^invalid plan: {re.escape(field)}: .*finite"):
        plan_from_dict(json.loads(json.dumps(raw)))


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "stages: [{percent: 100}]\n" + "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_before_they_expand() -> None:
    text = billion_laughs()  # 10^9 strings once expanded; under a kilobyte as text
    assert len(text) < 1024
    started = time.process_time()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError, match=r"aliases \(\*name\) are not allowed"):
            load_plan(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.process_time() - started < 5 and peak < 10 * 1024 * 1024


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="nested deeper than"):
        load_plan("stages: " + "[" * 30_000)


def test_plan_from_dict_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(InvalidRequestError, match="mapping"):
        plan_from_dict([{"percent": 100}])


def test_drift_and_accuracy_gates_are_set_per_plan_and_per_stage() -> None:
    plan = load_plan(
        """
        gates: {max_drift: 0.2, max_accuracy_drop: 0.05}
        stages:
          - {count: 1, gates: {max_drift: 0, min_labels: 200}}
          - {percent: 100}
        """
    )
    assert plan.stage_gates(0) == Gates(max_drift=0.0, max_accuracy_drop=0.05, min_labels=200)
    assert plan.stage_gates(1) == Gates(max_drift=0.2, max_accuracy_drop=0.05)
    assert Gates().max_drift is None and Gates().max_accuracy_drop is None
    assert Gates().min_labels == 50
    assert plan_from_dict(plan_to_dict(plan)) == plan


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{stages: [{percent: 100}], gates: {max_drift: 1.5}}",
            "gates.max_drift: Input should be less than or equal to 1",
        ),
        (
            "stages: [{percent: 100, gates: {max_accuracy_drop: -0.1}}]",
            "stages.0.gates.max_accuracy_drop: Input should be greater than or equal to 0",
        ),
        (
            "{stages: [{percent: 100}], gates: {min_labels: 0}}",
            "gates.min_labels: Input should be greater than or equal to 1",
        ),
    ],
)
def test_drift_and_accuracy_gate_values_out_of_range_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        load_plan(text)
    assert str(caught.value).startswith(f"invalid plan: {message}")


def test_stored_plans_with_an_empty_drift_gate_still_load() -> None:
    stored = plan_to_dict(load_plan(SMALLEST))
    stored["gates"]["max_drift"] = None
    stored["stages"][0]["gates"] = {"max_drift": None}
    plan = plan_from_dict(stored)
    assert plan.gates == Gates() and plan.stage_gates(0) == Gates()


def test_min_success_plus_max_failure_above_one_is_allowed() -> None:
    plan = load_plan(
        "{stages: [{percent: 100}], gates: {min_success_share: 1, max_failure_share: 0.5}}"
    )
    assert plan.gates.min_success_share + plan.gates.max_failure_share == 1.5


DEVICES = [f"d{i:02d}" for i in range(10)]

TARGETS = [
    # (plan, selection size, cumulative sizes per stage)
    ("stages: [{percent: 34}, {percent: 100}]", 3, [2, 3]),
    ("stages: [{percent: 33}, {percent: 100}]", 3, [1, 3]),
    ("stages: [{percent: 10}, {percent: 50}, {percent: 100}]", 10, [1, 5, 10]),
    ("stages: [{percent: 30}, {percent: 100}]", 10, [3, 10]),  # exact: 3.0, not 3.0000001
    ("stages: [{percent: 0.1}, {percent: 100}]", 10, [1, 10]),  # at least one
    ("stages: [{count: 3}, {percent: 100}]", 2, [2, 2]),  # capped at N
    ("stages: [{count: 1}, {count: 2}, {percent: 100}]", 10, [1, 2, 10]),
    # a stage that computes no more than the last still takes one more device
    ("stages: [{count: 5}, {percent: 20}, {percent: 100}]", 10, [5, 6, 10]),
    ("stages: [{percent: 10}, {percent: 20}, {percent: 100}]", 3, [1, 2, 3]),
    # more stages than devices: the last stages get none of their own
    ("stages: [{count: 1}, {count: 2}, {count: 3}, {percent: 100}]", 2, [1, 2, 2, 2]),
    ("stages: [{percent: 50}, {percent: 100}]", 0, [0, 0]),
]


@pytest.mark.parametrize(("text", "size", "sizes"), TARGETS)
def test_stage_targets_sizes(text: str, size: int, sizes: list[int]) -> None:
    selection = DEVICES[:size]
    targets = stage_targets(load_plan(text), selection)
    assert [len(t) for t in targets] == sizes
    for earlier, later in itertools.pairwise(targets):
        assert later[: len(earlier)] == earlier  # cumulative: a stage keeps the earlier ones
    assert targets[-1] == selection  # the last stage covers the whole selection, in order


def test_named_devices_come_first_and_are_not_taken_twice() -> None:
    plan = load_plan(
        "stages: [{devices: [d07, d03]}, {count: 4}, {devices: [d00]}, {percent: 100}]"
    )
    targets = stage_targets(plan, DEVICES)
    assert targets[0] == ["d07", "d03"]
    assert targets[1] == ["d07", "d03", "d01", "d02"]  # d00 is kept for its own stage
    assert targets[2] == ["d07", "d03", "d01", "d02", "d00"]
    assert sorted(targets[3]) == DEVICES
    assert len(targets[3]) == len(set(targets[3]))


def test_percent_after_named_devices_counts_them() -> None:
    plan = load_plan("stages: [{devices: [d09]}, {percent: 30}, {percent: 100}]")
    targets = stage_targets(plan, DEVICES)
    assert targets[1] == ["d09", "d00", "d01"]


def test_named_device_missing_from_selection_is_refused() -> None:
    plan = load_plan("stages: [{devices: [d01, ghost]}, {percent: 100}]")
    with pytest.raises(InvalidRequestError, match="'ghost'") as caught:
        stage_targets(plan, DEVICES)
    assert "d01" not in str(caught.value)


def test_repeated_ids_in_the_selection_count_once() -> None:
    plan = load_plan(SMALLEST)
    assert stage_targets(plan, ["a", "b", "a", "c", "b"]) == [["a", "b"], ["a", "b", "c"]]
