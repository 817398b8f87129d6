"""The install machine's tables and pure decisions, checked as data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgefleet.agent.install import RESUME, TERMINAL, TRANSITIONS, Event, HealthSnapshot, State
from edgefleet.agent.install.fetch import DOWNLOAD_BACKOFF, backoff_delay
from edgefleet.agent.install.health import Baseline, judge_health
from edgefleet.agent.install.record import InstallRecord, load_state
from edgefleet.agent.install.states import (
    TransitionError,
    next_state,
    refused_state,
    resume_state,
)
from edgefleet.agentconfig import HealthSettings

WORKING = [state for state in State if state not in TERMINAL]
BEFORE_SWITCH = [State.DOWNLOADING, State.VERIFYING, State.CHECKING, State.STAGING]
BEFORE_SWITCH += [State.SMOKE_TESTING]


def test_every_state_is_reachable_from_rest() -> None:
    reached = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)


@pytest.mark.parametrize("state", WORKING)
def test_every_working_state_can_fail(state: State) -> None:
    assert (state, Event.FAIL) in TRANSITIONS


@pytest.mark.parametrize("state", BEFORE_SWITCH)
def test_failure_before_activation_ends_failed_without_rolling_back(state: State) -> None:
    assert next_state(state, Event.FAIL) is State.FAILED


@pytest.mark.parametrize("state", [State.ACTIVATING, State.HEALTH_CHECKING, State.SHADOWING])
def test_failure_after_activation_or_shadowing_rolls_back(state: State) -> None:
    assert next_state(state, Event.FAIL) is State.ROLLING_BACK


def test_a_shadow_install_runs_beside_instead_of_activating() -> None:
    assert next_state(State.SMOKE_TESTING, Event.SHADOW) is State.SHADOWING
    assert next_state(State.SHADOWING, Event.DONE) is State.COMMITTED
    assert {source for (source, _), target in TRANSITIONS.items() if target is State.SHADOWING} == {
        State.SMOKE_TESTING
    }


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_an_install_or_rollback_starts_from_every_resting_state(state: State) -> None:
    assert next_state(state, Event.INSTALL) is State.DOWNLOADING
    assert next_state(state, Event.ROLLBACK) is State.ROLLING_BACK


def test_a_transition_not_in_the_table_is_a_bug() -> None:
    with pytest.raises(TransitionError):
        next_state(State.COMMITTED, Event.DONE)


# (persisted, current link, resumes as) with from = "old", to = "new".
RESUME_CASES = [
    (State.DOWNLOADING, "old", State.DOWNLOADING),
    (State.VERIFYING, "old", State.VERIFYING),
    (State.CHECKING, "old", State.VERIFYING),
    (State.STAGING, "old", State.VERIFYING),
    (State.SMOKE_TESTING, "old", State.VERIFYING),
    (State.ACTIVATING, "old", State.ACTIVATING),  # not switched yet: complete it
    (State.ACTIVATING, "new", State.ACTIVATING),  # switched: idempotent
    (State.ACTIVATING, "other", State.ROLLING_BACK),
    (State.HEALTH_CHECKING, "new", State.HEALTH_CHECKING),
    (State.HEALTH_CHECKING, "old", State.ROLLING_BACK),
    (State.SHADOWING, "old", State.SHADOWING),  # current never moves: hand it over again
    (State.ROLLING_BACK, "new", State.ROLLING_BACK),
    (State.ROLLING_BACK, "old", State.ROLLING_BACK),
]


@pytest.mark.parametrize(("persisted", "current", "resumed"), RESUME_CASES)
def test_resume_table(persisted: State, current: str, resumed: State) -> None:
    assert resume_state(persisted, current, "old", "new") is resumed


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_resting_states_do_not_resume(state: State) -> None:
    assert resume_state(state, "old", "old", "new") is None


def test_resume_table_covers_every_working_state() -> None:
    assert set(RESUME) == set(WORKING)


def record(kind: str = "install", *, shadow: bool = False, to: str = "new") -> InstallRecord:
    return InstallRecord.model_validate(
        {"kind": kind, "started_at": "2025-01-01T00:00:00Z", "from_version": "old"}
        | {"from_challenger": "x", "to_version": to, "shadow": shadow}
    )


# (record, state entered, challenger persisted before, challenger persisted with it)
CHALLENGER_CASES = [
    (record(shadow=True), State.SHADOWING, "x", "new"),  # replaces the one running
    (record(shadow=True), State.ROLLING_BACK, "new", "x"),  # it failed: the old one back
    (record(shadow=True), State.FAILED, "x", "x"),  # the smoke test failed: nothing changes
    (record(shadow=True), State.COMMITTED, "new", "new"),
    (record(to="x"), State.ACTIVATING, "x", None),  # a promotion
    (record(to="x"), State.ROLLING_BACK, None, "x"),  # a failed promotion: back in shadow
    (record(), State.ACTIVATING, "x", "x"),  # another bundle: the challenger keeps running
    (record(), State.COMMITTED, "x", "x"),
    (record("rollback", to="older"), State.ROLLING_BACK, "x", None),  # a rollback stops it
]


@pytest.mark.parametrize(("install", "entered", "before", "after"), CHALLENGER_CASES)
def test_challenger_persisted_on_entering_each_state(
    install: InstallRecord, entered: State, before: str | None, after: str | None
) -> None:
    assert install.challenger_on_entering(entered, before) == after


@pytest.mark.parametrize("state", [*sorted(TERMINAL), *BEFORE_SWITCH])
def test_a_refusal_leaves_the_machine_resting_as_before(state: State) -> None:
    assert refused_state(state, serving=True) is State.COMMITTED
    assert refused_state(state, serving=False) is State.IDLE
    assert (state, Event.REFUSE) not in TRANSITIONS  # never FAILED


@pytest.mark.parametrize(
    "state", [State.ACTIVATING, State.HEALTH_CHECKING, State.SHADOWING, State.ROLLING_BACK]
)
def test_nothing_is_refused_once_something_was_switched(state: State) -> None:
    with pytest.raises(TransitionError):
        refused_state(state, serving=True)


def stating(floor: int | None, kind: str = "install", **fields: object) -> InstallRecord:
    return record(kind).model_copy(update={"bundle_name": "m", "security_floor": floor, **fields})


# (record, state entered, floors persisted with it)
FLOOR_CASES = [
    (stating(7), State.COMMITTED, {"m": 7, "m2": 9}),  # a release stating a floor commits
    (stating(3), State.COMMITTED, {"m": 5, "m2": 9}),  # never lowered
    (stating(None), State.COMMITTED, {"m": 5, "m2": 9}),  # states none: unchanged
    (stating(7), State.HEALTH_CHECKING, {"m": 5, "m2": 9}),  # not before its health check
    (stating(7), State.ROLLING_BACK, {"m": 5, "m2": 9}),
    (stating(7), State.FAILED, {"m": 5, "m2": 9}),  # the health check failed
    (stating(7, shadow=True), State.COMMITTED, {"m": 5, "m2": 9}),  # runs in shadow only
    (stating(7, refused="tampered-file"), State.COMMITTED, {"m": 5, "m2": 9}),
    (stating(7, "rollback"), State.COMMITTED, {"m": 5, "m2": 9}),
]


@pytest.mark.parametrize(("install", "entered", "floors"), FLOOR_CASES)
def test_only_a_committed_release_stating_a_floor_raises_its_names_floor(
    install: InstallRecord, entered: State, floors: dict[str, int]
) -> None:
    assert install.floors_on_entering(entered, {"m": 5, "m2": 9}) == floors


@pytest.mark.parametrize("old_format", [1, 2])
def test_the_single_floor_of_an_older_state_file_becomes_the_served_names(
    tmp_path: Path, old_format: int
) -> None:
    path = tmp_path / "state.json"
    old = {"format": old_format, "state": "committed", "security_floor": 1_000_002_000_000}
    path.write_text(json.dumps(old))
    state = load_state(path, served_name="demo")
    assert state.format == 4 and state.security_floors == {"demo": 1_000_002_000_000}
    assert load_state(path, served_name=None).security_floors == {}  # nothing to name it by
    path.write_text(json.dumps({**old, "security_floor": 0}))
    assert load_state(path, served_name="demo").security_floors == {}
    # Capped at the previous version of the served model: its rollback stays possible.
    path.write_text(json.dumps(old))
    capped = load_state(path, served_name="demo", rollback_counter=1_000_001_000_000)
    assert capped.security_floors == {"demo": 1_000_001_000_000}


def test_a_format_3_state_file_keeps_its_floors_and_trusts_the_fallback_root(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    old = {"format": 3, "state": "committed", "last_directive_sequence": 7}
    path.write_text(json.dumps({**old, "security_floors": {"demo": 5, "other": 2}}))
    state = load_state(path, served_name="demo", rollback_counter=1)
    assert state.format == 4 and state.security_floors == {"demo": 5, "other": 2}
    snapshot = state.trust_snapshot(b"flashed root")
    assert (snapshot.root, snapshot.directive_sequence, snapshot.timestamp_sequence) == (
        b"flashed root",
        7,
        0,
    )


SETTINGS = HealthSettings(
    duration_seconds=60,
    min_requests=20,
    max_error_rate=0.05,
    max_fallback_rate=0.05,
    max_latency_ratio=1.5,
)
BASELINE = Baseline(requests=100, latency_p95_ms=10.0)

# (snapshot, baseline, failure message fragment or None)
HEALTH_CASES = [
    (HealthSnapshot(100, 0, 0, 10.0), BASELINE, None),
    (HealthSnapshot(100, 5, 5, 14.9), BASELINE, None),  # at every limit: passes
    (HealthSnapshot(100, 6, 0, 10.0), BASELINE, "error rate 6.0%"),
    (HealthSnapshot(100, 0, 6, 10.0), BASELINE, "fallback rate 6.0%"),
    (HealthSnapshot(100, 0, 0, 15.1), BASELINE, "p95 latency 15.10 ms"),
    (HealthSnapshot(100, 0, 0, 99.0), None, None),  # no baseline: latency not judged
    (HealthSnapshot(100, 0, 0, 99.0), Baseline(5, 1.0), None),  # baseline too thin
    (HealthSnapshot(10, 0, 0, 99.0), BASELINE, None),  # too few requests for a p95
    (HealthSnapshot(3, 1, 0, 1.0), BASELINE, None),  # 1 error of at least 20 requests: 5%
    (HealthSnapshot(3, 2, 0, 1.0), BASELINE, "error rate 10.0% (2 of 3 requests, counted"),
    (HealthSnapshot(0, 0, 0, None), BASELINE, None),
]


@pytest.mark.parametrize(("snapshot", "baseline", "failure"), HEALTH_CASES)
def test_health_judgement(
    snapshot: HealthSnapshot, baseline: Baseline | None, failure: str | None
) -> None:
    verdict = judge_health(snapshot, baseline, SETTINGS)
    if failure is None:
        assert verdict is None
    else:
        assert verdict is not None and failure in verdict


def test_backoff_grows_is_jittered_and_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(attempt, rng) for attempt in range(1, 12)]
    assert 1.0 <= delays[0] <= 2.0 and 2.0 <= delays[1] <= 4.0 and 4.0 <= delays[2] <= 8.0
    cap = DOWNLOAD_BACKOFF.maximum
    assert all(cap / 2 <= d <= cap for d in delays[-3:])
    assert len({round(d, 6) for d in delays}) == len(delays)
