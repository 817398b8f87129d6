"""Stage gates: every branch of evaluate_stage, table-driven."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from edgefleet.server.drift.accuracy import Labelled, ReferenceAccuracy
from edgefleet.server.rollouts.gates import (
    Drifting,
    GateCheck,
    GateDecision,
    StageCounts,
    Verdict,
    evaluate_stage,
)
from edgefleet.server.rollouts.plan import Gates

ADVANCE, WAIT, FAIL = GateDecision.ADVANCE, GateDecision.WAIT, GateDecision.FAIL
PASSED = ["every gate passed"]

# A stage of 10 devices, all installed and settled long ago, with healthy traffic.
HEALTHY: dict[str, Any] = {
    "assigned": 10,
    "succeeded": 10,
    "reporting": 10,
    "requests": 1000,
    "errors": 10,
    "fallbacks": 10,
    "latency_p95_ms": 20.0,
    "previous_latency_p95_ms": 20.0,
    "stage_elapsed_s": 600.0,
    "settled_elapsed_s": 300.0,
}


DRIFT = {"max_drift": 0.1}
ONE_DRIFTS = (Drifting("dev-01", ("temperature",)),)
TWO_DRIFT = (Drifting("dev-01", ("pressure", "temperature")), Drifting("dev-03", ("dataset",)))
ACCURACY = {"max_accuracy_drop": 0.05}
REFERENCE_95 = ReferenceAccuracy("accuracy", 0.95)
RMSE_2 = ReferenceAccuracy("rmse", 2.0)


@dataclass(frozen=True)
class Case:
    counts: dict[str, Any]  # applied over HEALTHY
    decision: GateDecision
    reasons: list[str] = field(default_factory=list)  # substrings of every reason, in order
    gates: dict[str, Any] = field(default_factory=dict)
    shadow: bool = False
    passed: dict[str, bool | None] = field(default_factory=dict)  # check name -> passed


CASES = {
    # --- advance ---
    "healthy stage advances": Case({}, ADVANCE, ["every gate passed"]),
    "no devices of its own advances at once": Case(
        {"assigned": 0, "succeeded": 0, "settled_elapsed_s": None}, ADVANCE, ["no devices"]
    ),
    "one failure in ten is at the limit, not over it": Case(
        {"succeeded": 9, "failed": 1}, ADVANCE, PASSED, passed={"max_failure_share": True}
    ),
    "zero bake advances as soon as settled": Case(
        {"settled_elapsed_s": 0.0}, ADVANCE, PASSED, gates={"bake_s": 0}, passed={"bake_s": True}
    ),
    "error rate at the limit passes": Case(
        {"errors": 50}, ADVANCE, PASSED, passed={"max_error_rate": True}
    ),
    "health not judged without enough requests": Case(
        {"requests": 19, "errors": 19, "fallbacks": 19, "latency_p95_ms": 900.0},
        ADVANCE,
        PASSED,
        passed={"max_error_rate": None, "max_fallback_rate": None, "max_latency_p95_ratio": None},
    ),
    "latency at the ratio passes": Case(
        {"latency_p95_ms": 30.0}, ADVANCE, PASSED, passed={"max_latency_p95_ratio": True}
    ),
    "latency not judged without the previous version's": Case(
        {"latency_p95_ms": 900.0, "previous_latency_p95_ms": None},
        ADVANCE,
        PASSED,
        passed={"max_latency_p95_ratio": None},
    ),
    "latency not judged when none reported": Case(
        {"latency_p95_ms": None}, ADVANCE, PASSED, passed={"max_latency_p95_ratio": None}
    ),
    "shadow agreement at the limit passes": Case(
        {"shadow_requests": 100, "shadow_agreements": 95},
        ADVANCE,
        PASSED,
        shadow=True,
        passed={"min_shadow_agreement": True},
    ),
    "shadow agreement not judged with few comparisons": Case(
        {"shadow_requests": 19, "shadow_agreements": 0},
        ADVANCE,
        PASSED,
        shadow=True,
        passed={"min_shadow_agreement": None},
    ),
    "a normal stage ignores shadow counts": Case(
        {"shadow_requests": 100, "shadow_agreements": 0},
        ADVANCE,
        PASSED,
        passed={"min_shadow_agreement": None},
    ),
    "reporting is capped at the stage's size": Case(
        {"assigned": 2, "succeeded": 2, "reporting": 2}, ADVANCE, PASSED, gates={"min_reporting": 5}
    ),
    "reporting is capped at the devices that installed": Case(
        {"succeeded": 9, "failed": 1, "reporting": 9},
        ADVANCE,
        PASSED,
        gates={"min_reporting": 10},
        passed={"min_reporting": True},
    ),
    "success reached with the rest offline bakes from success": Case(
        {
            "succeeded": 9,
            "notified": 1,
            "offline": 1,
            "settled_elapsed_s": None,
            "success_elapsed_s": 60.0,
        },
        ADVANCE,
        PASSED,
        passed={"bake_s": True, "min_success_share": True},
    ),
    # --- wait ---
    "installs still running": Case(
        {"assigned": 2, "succeeded": 1, "installing": 1, "reporting": 1, "settled_elapsed_s": None},
        WAIT,
        ["waiting: 1 of 2 devices installed (2 needed)"],
        passed={"min_success_share": None, "bake_s": None},
    ),
    "baking after settling": Case(
        {"settled_elapsed_s": 30.0}, WAIT, ["baking: 30 s of 60 s"], passed={"bake_s": None}
    ),
    "success reached but unfinished devices and no success time": Case(
        {"succeeded": 9, "notified": 1, "offline": 1, "settled_elapsed_s": None},
        WAIT,
        ["waiting: 1 device(s) still to finish, 1 offline before baking"],
    ),
    "baking since the success share was reached": Case(
        {"succeeded": 9, "installing": 1, "settled_elapsed_s": None, "success_elapsed_s": 10.0},
        WAIT,
        ["baking: 10 s of 60 s"],
    ),
    "telemetry from too few devices": Case(
        {"reporting": 1},
        WAIT,
        ["waiting: telemetry from 1 of 2 devices needed"],
        gates={"min_reporting": 2},
        passed={"min_reporting": None, "bake_s": True},
    ),
    "several things missing are all named": Case(
        {"succeeded": 5, "pending": 5, "reporting": 0, "settled_elapsed_s": None},
        WAIT,
        ["waiting: 5 of 10 devices installed (9 needed)", "waiting: telemetry from 0 of 3"],
        gates={"min_reporting": 3},
    ),
    "offline devices are named while waiting": Case(
        {"succeeded": 5, "notified": 5, "offline": 3, "settled_elapsed_s": None},
        WAIT,
        ["waiting: 5 of 10 devices installed (9 needed, 3 offline)"],
    ),
    # --- fail ---
    "failure share over the limit": Case(
        {"succeeded": 8, "failed": 2},
        FAIL,
        [
            "max_failure_share: 2 of 10 devices failed or timed out (20.0%; at most 0.1)",
            # Every device finished: 8 of 10 can no longer reach the 0.9 share either.
            "min_success_share: every device finished and 8 of 10 installed (80.0%; at least 0.9)",
        ],
        passed={"max_failure_share": False, "min_success_share": False},
    ),
    "timed out devices count as failed": Case(
        {"succeeded": 8, "failed": 1, "timed_out": 1},
        FAIL,
        ["max_failure_share: 2 of 10", "min_success_share: every device finished and 8 of 10"],
    ),
    "failure share fails before the others finish": Case(
        {"succeeded": 0, "failed": 2, "installing": 8, "settled_elapsed_s": None},
        FAIL,
        ["max_failure_share"],
    ),
    "settled below the success share fails": Case(
        {"succeeded": 9, "failed": 1},
        FAIL,
        ["min_success_share: every device finished and 9 of 10 installed"],
        gates={"min_success_share": 1.0, "max_failure_share": 0.5},
        passed={"max_failure_share": True, "min_success_share": False},
    ),
    "error rate over the limit": Case(
        {"errors": 51}, FAIL, ["max_error_rate: 51 errors in 1000 requests (5.1%"]
    ),
    "fallback rate over the limit": Case(
        {"fallbacks": 200}, FAIL, ["max_fallback_rate: 200 fallbacks in 1000 requests"]
    ),
    "latency over the ratio": Case(
        {"latency_p95_ms": 31.0}, FAIL, ["max_latency_p95_ratio: p95 31 ms vs 20 ms before"]
    ),
    "latency over the ratio, with how far back it reads": Case(
        {"latency_p95_ms": 31.0, "latency_minutes": 500},
        FAIL,
        ["max_latency_p95_ratio: p95 31 ms vs 20 ms before, each over 8.33 h (x1.55"],
    ),
    "shadow disagreement": Case(
        {"shadow_requests": 100, "shadow_agreements": 94},
        FAIL,
        ["min_shadow_agreement: 94 of 100 shadow answers agree"],
        shadow=True,
    ),
    "health fails while installs still run": Case(
        {"succeeded": 3, "installing": 7, "settled_elapsed_s": None, "errors": 500},
        FAIL,
        ["max_error_rate"],
    ),
    "every failing check is a reason": Case(
        {"succeeded": 7, "failed": 3, "errors": 100, "fallbacks": 100},
        FAIL,
        ["max_failure_share", "min_success_share", "max_error_rate", "max_fallback_rate"],
    ),
    "stage override is what counts": Case(
        {"errors": 30}, FAIL, ["max_error_rate"], gates={"max_error_rate": 0.01}
    ),
    # --- drift ---
    "drift is not judged without max_drift": Case(
        {"drifting": TWO_DRIFT, "cohort_drift": ("x",)}, ADVANCE, PASSED, passed={"max_drift": None}
    ),
    "one drifting device in ten is at the limit": Case(
        {"drifting": ONE_DRIFTS}, ADVANCE, PASSED, gates=DRIFT, passed={"max_drift": True}
    ),
    "two drifting devices in ten are over the limit": Case(
        {"drifting": TWO_DRIFT}, FAIL, ["max_drift: 2 of 10 devices drift"], gates=DRIFT
    ),
    "a drifting stage cohort fails the stage": Case(
        {"cohort_drift": ("pressure",)}, FAIL, ["drift as a whole (pressure)"], gates=DRIFT
    ),
    "drift is not judged before any telemetry": Case(
        {"drifting": TWO_DRIFT, "reporting": 0},
        ADVANCE,
        PASSED,
        gates={"max_drift": 0.0},
        passed={"max_drift": None},
    ),
    "drift is not judged in a shadow stage": Case(
        {"drifting": TWO_DRIFT, "shadow_requests": 100, "shadow_agreements": 100},
        ADVANCE,
        PASSED,
        gates={"max_drift": 0.0},
        shadow=True,
        passed={"max_drift": None},
    ),
    # --- accuracy ---
    "accuracy is not judged without max_accuracy_drop": Case(
        {"labels": Labelled(100, 10), "reference": REFERENCE_95},
        ADVANCE,
        PASSED,
        passed={"max_accuracy_drop": None},
    ),
    "60% labelled accuracy against a 95% reference fails": Case(
        {"labels": Labelled(100, 60), "reference": REFERENCE_95},
        FAIL,
        ["max_accuracy_drop: 60 of 100 labels right (60.0%) vs 95.0% from the converter's"],
        gates=ACCURACY,
    ),
    "accuracy exactly at the reference minus the drop passes": Case(
        {"labels": Labelled(100, 90), "reference": REFERENCE_95},
        ADVANCE,
        PASSED,
        gates=ACCURACY,
        passed={"max_accuracy_drop": True},
    ),
    "accuracy below min_labels is not judged": Case(
        {"labels": Labelled(49, 0), "reference": REFERENCE_95},
        ADVANCE,
        PASSED,
        gates=ACCURACY,
        passed={"max_accuracy_drop": None},
    ),
    "without a reference the previous version's accuracy is the reference": Case(
        {"labels": Labelled(100, 80), "previous_labels": Labelled(50, 45)},
        FAIL,
        ["80.0%) vs 90.0% from the previous version"],
        gates=ACCURACY,
    ),
    "without a reference and too few previous labels accuracy is not judged": Case(
        {"labels": Labelled(100, 0), "previous_labels": Labelled(49, 49)},
        ADVANCE,
        PASSED,
        gates=ACCURACY,
        passed={"max_accuracy_drop": None},
    ),
    "regression: RMSE at the reference times (1 + drop) passes": Case(
        {"labels": Labelled(100, 0, squared_error=900.0), "reference": RMSE_2},
        ADVANCE,
        PASSED,
        gates={"max_accuracy_drop": 0.5},
        passed={"max_accuracy_drop": True},
    ),
    "regression: RMSE above the reference times (1 + drop) fails": Case(
        {"labels": Labelled(100, 0, squared_error=1600.0), "reference": RMSE_2},
        FAIL,
        ["max_accuracy_drop: RMSE 4 over 100 labels vs 2 from the converter's"],
        gates={"max_accuracy_drop": 0.5},
    ),
    "regression against the previous version": Case(
        {
            "labels": Labelled(100, 0, squared_error=1600.0),
            "previous_labels": Labelled(100, 0, squared_error=400.0),
        },
        FAIL,
        ["vs 2 from the previous version before the stage (at most x1.5)"],
        gates={"max_accuracy_drop": 0.5},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_evaluate_stage(case: Case) -> None:
    gates = Gates.model_validate(Gates().model_dump() | case.gates)
    verdict = evaluate_stage(gates, StageCounts(**(HEALTHY | case.counts)), shadow=case.shadow)
    assert verdict.decision is case.decision, verdict
    assert len(verdict.reasons) == len(case.reasons), verdict.reasons
    for want, got in zip(case.reasons, verdict.reasons, strict=True):
        assert want in got, verdict.reasons
    results = {check.name: check.passed for check in verdict.checks}
    for name, passed in case.passed.items():
        assert results[name] is passed, (name, verdict.checks)
    if verdict.decision is FAIL:
        failed = {check.name for check in verdict.checks if check.passed is False}
        assert [r.split(":")[0] for r in verdict.reasons] == [
            c.name for c in verdict.checks if c.name in failed
        ]
    if verdict.decision is ADVANCE:
        assert not any(check.passed is False for check in verdict.checks)


def test_every_gate_has_a_check() -> None:
    verdict = evaluate_stage(Gates(), StageCounts(**HEALTHY), shadow=True)
    assert [check.name for check in verdict.checks] == [
        "max_failure_share",
        "min_success_share",
        "max_error_rate",
        "max_fallback_rate",
        "max_latency_p95_ratio",
        "min_shadow_agreement",
        "max_drift",
        "max_accuracy_drop",
        "min_reporting",
        "bake_s",
    ]
    thresholds = {"min_requests", "min_labels"}  # how much data a check needs, not checks
    assert set(Gates.model_fields) - thresholds == {c.name for c in verdict.checks}


def test_shares_are_compared_exactly() -> None:
    # 0.1 * 30 is 3.0000000000000004 in floats; 3 of 30 is exactly at the limit.
    counts = StageCounts(**(HEALTHY | {"assigned": 30, "succeeded": 27, "failed": 3}))
    assert evaluate_stage(Gates(), counts, shadow=False).decision is ADVANCE
    counts = StageCounts(**(HEALTHY | {"assigned": 30, "succeeded": 26, "failed": 4}))
    assert evaluate_stage(Gates(), counts, shadow=False).decision is FAIL


def test_verdict_is_json_safe() -> None:
    verdict = evaluate_stage(Gates(), StageCounts(**HEALTHY), shadow=False)
    data = verdict.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["decision"] == "advance"
    assert data["checks"][0] == {
        "name": "max_failure_share",
        "passed": True,
        "detail": "0 of 10 devices failed or timed out (0.0%; at most 0.1)",
    }
    assert Verdict(WAIT, ["x"], [GateCheck("bake_s", None, "y")]).to_dict()["checks"] == [
        {"name": "bake_s", "passed": None, "detail": "y"}
    ]


def test_drift_detail_names_devices_and_features() -> None:
    gates = Gates(max_drift=0.1)
    counts = StageCounts(**(HEALTHY | {"drifting": TWO_DRIFT}))
    check = next(
        c for c in evaluate_stage(gates, counts, shadow=False).checks if c.name == "max_drift"
    )
    assert check == GateCheck(
        "max_drift",
        False,
        "2 of 10 devices drift: dev-01 (pressure, temperature), dev-03 (dataset); at most 0.1",
    )
    many = tuple(Drifting(f"dev-{i:02d}", ("a", "b", "c", "d")) for i in range(5))
    counts = StageCounts(**(HEALTHY | {"drifting": many}))
    check = next(
        c for c in evaluate_stage(gates, counts, shadow=False).checks if c.name == "max_drift"
    )
    assert check.detail == (
        "5 of 10 devices drift: dev-00 (a, b, c and 1 more), dev-01 (a, b, c and 1 more), "
        "dev-02 (a, b, c and 1 more) and 2 more; at most 0.1"
    )
