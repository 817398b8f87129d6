"""The install machine's tables and pure decisions, checked as data."""

from __future__ import annotations

import random

import pytest

from edgefleet.agent.config import HealthSettings
from edgefleet.agent.install import RESUME, TERMINAL, TRANSITIONS, Event, HealthSnapshot, State
from edgefleet.agent.install.fetch import BACKOFF_CAP_SECONDS, backoff_delay
from edgefleet.agent.install.health import Baseline, judge_health
from edgefleet.agent.install.record import InstallRecord
from edgefleet.agent.install.states import TransitionError, next_state, resume_state

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
    (HealthSnapshot(3, 1, 0, 1.0), BASELINE, "error rate 33.3%"),  # rates judged on any
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
    assert all(BACKOFF_CAP_SECONDS / 2 <= d <= BACKOFF_CAP_SECONDS for d in delays[-3:])
    assert len({round(d, 6) for d in delays}) == len(delays)
