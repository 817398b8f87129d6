"""The rollout state machine: the table, and apply_event on both database backends."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import func, select, update

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Rollout, RolloutTransition
from edgefleet.server.errors import RolloutStateError, StorageError
from edgefleet.server.rollouts.machine import (
    TRANSITIONS,
    RolloutEvent,
    RolloutState,
    allowed_events,
    apply_event,
    next_state,
)
from edgefleet.server.rollouts.plan import load_plan, plan_to_dict
from tests.server.rolloutsim import existing_or_new_bundle

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)

# Every (state, event) pair the table accepts, with where it leads.
ACCEPTED = [
    (RolloutState.CREATED, RolloutEvent.START, "abort", RolloutState.RUNNING),
    (RolloutState.RUNNING, RolloutEvent.ADVANCE, "abort", RolloutState.RUNNING),
    (RolloutState.RUNNING, RolloutEvent.COMPLETE, "abort", RolloutState.COMPLETED),
    (RolloutState.RUNNING, RolloutEvent.PAUSE, "abort", RolloutState.PAUSED),
    (RolloutState.PAUSED, RolloutEvent.RESUME, "abort", RolloutState.RUNNING),
    (RolloutState.RUNNING, RolloutEvent.ABORT, "abort", RolloutState.ABORTING),
    (RolloutState.PAUSED, RolloutEvent.ABORT, "abort", RolloutState.ABORTING),
    (RolloutState.RUNNING, RolloutEvent.GATE_FAILED, "abort", RolloutState.ABORTING),
    (RolloutState.RUNNING, RolloutEvent.GATE_FAILED, "pause", RolloutState.PAUSED),
    (RolloutState.ABORTING, RolloutEvent.ROLLED_BACK, "abort", RolloutState.ABORTED),
]


@pytest.mark.parametrize(("state", "event", "on_gate_failure", "target"), ACCEPTED)
def test_table_accepts(
    state: RolloutState, event: RolloutEvent, on_gate_failure: str, target: RolloutState
) -> None:
    assert next_state(state, event, on_gate_failure=on_gate_failure) is target


def test_table_refuses_every_other_pair() -> None:
    accepted = {(state, event) for state, event, _, _ in ACCEPTED}
    assert set(TRANSITIONS) == accepted
    for state in RolloutState:
        for event in RolloutEvent:
            if (state, event) not in accepted:
                assert next_state(state, event) is None, (state, event)


def test_final_states_accept_nothing() -> None:
    assert allowed_events(RolloutState.COMPLETED) == []
    assert allowed_events(RolloutState.ABORTED) == []
    assert set(allowed_events(RolloutState.PAUSED)) == {RolloutEvent.RESUME, RolloutEvent.ABORT}


# --- apply_event on a real database ------------------------------------------------------

THREE_STAGES = "stages: [{count: 1}, {percent: 50}, {percent: 100}]"


def make_rollout(
    db: Database,
    *,
    plan: str = THREE_STAGES,
    state: RolloutState = RolloutState.CREATED,
    stage: int = 0,
) -> int:
    bundle_id = existing_or_new_bundle(db, now=T0)
    with db.session() as session:
        rollout = Rollout(
            bundle_id=bundle_id,
            selector={},
            plan=plan_to_dict(load_plan(plan)),
            state=state,
            stage_index=stage,
            stage_started_at=None if state is RolloutState.CREATED else T0,
            created_by="ops",
            created_at=T0,
            updated_at=T0,
        )
        session.add(rollout)
        session.flush()
        return rollout.id


def apply(db: Database, rollout_id: int, event: RolloutEvent, now: dt.datetime) -> Rollout:
    with db.session() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        apply_event(session, rollout, event, actor="alice", reason=f"{event.value} now", now=now)
        assert not session.dirty  # the UPDATE already wrote what the object holds
        return rollout


def stored(db: Database, rollout_id: int) -> tuple[Rollout, list[RolloutTransition]]:
    with db.session() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        transitions = session.scalars(
            select(RolloutTransition)
            .where(RolloutTransition.rollout_id == rollout_id)
            .order_by(RolloutTransition.id)
        ).all()
        return rollout, list(transitions)


def test_a_rollout_runs_its_stages_to_completion(database: Database) -> None:
    rid = make_rollout(database)
    times = [T0 + dt.timedelta(minutes=m) for m in range(5)]
    apply(database, rid, RolloutEvent.START, times[0])
    apply(database, rid, RolloutEvent.ADVANCE, times[1])
    apply(database, rid, RolloutEvent.ADVANCE, times[2])
    apply(database, rid, RolloutEvent.COMPLETE, times[3])
    rollout, transitions = stored(database, rid)
    assert (rollout.state, rollout.stage_index) == ("completed", 2)
    assert rollout.stage_started_at == times[2]
    assert rollout.updated_at == times[3]
    assert rollout.reason is None
    assert [(t.from_state, t.to_state, t.stage_index) for t in transitions] == [
        ("created", "running", 0),
        ("running", "running", 1),
        ("running", "running", 2),
        ("running", "completed", 2),
    ]
    assert [t.at for t in transitions] == times[:4]
    assert {t.actor for t in transitions} == {"alice"}
    assert transitions[1].reason == "advance now"


def test_pause_resume_abort_keep_the_reason_of_the_stop(database: Database) -> None:
    rid = make_rollout(database, state=RolloutState.RUNNING, stage=1)
    apply(database, rid, RolloutEvent.PAUSE, T0)
    assert stored(database, rid)[0].reason == "pause now"
    apply(database, rid, RolloutEvent.RESUME, T0)
    rollout, _ = stored(database, rid)
    assert (rollout.state, rollout.reason, rollout.stage_index) == ("running", None, 1)
    assert rollout.stage_started_at == T0  # resuming does not restart the stage
    apply(database, rid, RolloutEvent.ABORT, T0)
    apply(database, rid, RolloutEvent.ROLLED_BACK, T0)
    rollout, transitions = stored(database, rid)
    assert (rollout.state, rollout.reason) == ("aborted", "abort now")
    assert [t.to_state for t in transitions] == ["paused", "running", "aborting", "aborted"]


@pytest.mark.parametrize(("on_gate_failure", "state"), [("abort", "aborting"), ("pause", "paused")])
def test_gate_failure_follows_the_plan(
    database: Database, on_gate_failure: str, state: str
) -> None:
    plan = f"{{on_gate_failure: {on_gate_failure}, stages: [{{percent: 100}}]}}"
    rid = make_rollout(database, plan=plan, state=RolloutState.RUNNING)
    apply(database, rid, RolloutEvent.GATE_FAILED, T0)
    rollout, transitions = stored(database, rid)
    assert (rollout.state, rollout.reason) == (state, "gate_failed now")
    assert [(t.from_state, t.to_state) for t in transitions] == [("running", state)]


REFUSED = [
    # (state, stage, event, message)
    (RolloutState.ABORTED, 0, RolloutEvent.PAUSE, "is aborted; cannot pause"),
    (RolloutState.COMPLETED, 2, RolloutEvent.ABORT, "is completed; cannot abort"),
    (RolloutState.ABORTING, 0, RolloutEvent.ABORT, "is aborting; cannot abort"),
    (RolloutState.ABORTING, 0, RolloutEvent.RESUME, "is aborting; cannot resume"),
    (RolloutState.RUNNING, 0, RolloutEvent.RESUME, "is running; cannot resume"),
    (RolloutState.PAUSED, 0, RolloutEvent.PAUSE, "is paused; cannot pause"),
    (RolloutState.PAUSED, 0, RolloutEvent.ADVANCE, "is paused; cannot advance"),
    (RolloutState.RUNNING, 0, RolloutEvent.START, "is running; cannot start"),
    (RolloutState.RUNNING, 0, RolloutEvent.ROLLED_BACK, "is running; cannot finish rolling back"),
    (RolloutState.RUNNING, 2, RolloutEvent.ADVANCE, "last stage (3 of 3); cannot advance"),
    (RolloutState.RUNNING, 1, RolloutEvent.COMPLETE, "stage 2 of 3; cannot complete"),
]


def test_refused_event_names_state_and_event_and_changes_nothing(database: Database) -> None:
    # One database for the whole table: the refusals do not depend on each other.
    for state, stage, event, message in REFUSED:
        rid = make_rollout(database, state=state, stage=stage)
        with pytest.raises(RolloutStateError, match=f"rollout {rid} ") as caught:
            apply(database, rid, event, T0 + dt.timedelta(hours=1))
        assert message in str(caught.value), (state, event)
        rollout, transitions = stored(database, rid)
        assert (rollout.state, rollout.stage_index, rollout.updated_at) == (state.value, stage, T0)
        assert transitions == [], (state, event)


def test_a_state_outside_the_machine_is_never_stored(database: Database) -> None:
    rid = make_rollout(database, state=RolloutState.RUNNING)
    with pytest.raises(StorageError, match="exploded"), database.session() as session:
        session.execute(update(Rollout).where(Rollout.id == rid).values(state="exploded"))
    rollout, transitions = stored(database, rid)
    assert rollout.state is RolloutState.RUNNING and transitions == []


def test_stale_read_loses_and_writes_nothing(database: Database) -> None:
    rid = make_rollout(database, state=RolloutState.RUNNING)
    with database.session() as session:
        stale = session.get(Rollout, rid)
        assert stale is not None and stale.state == "running"
        apply(database, rid, RolloutEvent.PAUSE, T0)  # another unit of work wins meanwhile
        with pytest.raises(RolloutStateError, match="changed concurrently"):
            apply_event(session, stale, RolloutEvent.ABORT, actor="bob", reason="stop", now=T0)
    rollout, transitions = stored(database, rid)
    assert rollout.state == "paused"
    assert [(t.to_state, t.actor) for t in transitions] == [("paused", "alice")]


def test_stale_stage_loses_a_second_advance(database: Database) -> None:
    # Two drivers that both saw stage 0 passing must not advance twice.
    rid = make_rollout(database, state=RolloutState.RUNNING)
    with database.session() as session:
        stale = session.get(Rollout, rid)
        assert stale is not None
        apply(database, rid, RolloutEvent.ADVANCE, T0)
        with pytest.raises(RolloutStateError, match="changed concurrently"):
            apply_event(
                session, stale, RolloutEvent.ADVANCE, actor="driver", reason="gates", now=T0
            )
    rollout, _ = stored(database, rid)
    assert rollout.stage_index == 1


def _race_once(db: Database, rid: int) -> dict[str, BaseException | None]:
    """An operator pauses while another aborts: both read `running`, then both write."""
    outcome: dict[str, BaseException | None] = {}
    read = threading.Barrier(2, timeout=10)

    def act(event: RolloutEvent, actor: str) -> None:
        try:
            with db.session() as session:
                rollout = session.get(Rollout, rid)
                assert rollout is not None and rollout.state == "running"
                read.wait()  # both hold the same read before either writes
                apply_event(session, rollout, event, actor=actor, reason=actor, now=T0)
                time.sleep(0.05)  # keep the winner's transaction open while the other writes
            outcome[actor] = None
        except BaseException as exc:  # recorded; the test asserts on it
            outcome[actor] = exc

    threads = [
        threading.Thread(target=act, args=(RolloutEvent.PAUSE, "pauser")),
        threading.Thread(target=act, args=(RolloutEvent.ABORT, "aborter")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcome


def test_concurrent_pause_and_abort_cannot_both_win(database: Database) -> None:
    for _ in range(4):
        rid = make_rollout(database, state=RolloutState.RUNNING)
        outcome = _race_once(database, rid)
        winners = [actor for actor, error in outcome.items() if error is None]
        losers = [error for error in outcome.values() if error is not None]
        assert len(winners) == 1, outcome
        assert len(losers) == 1 and isinstance(losers[0], RolloutStateError), outcome
        assert "changed concurrently" in str(losers[0])
        rollout, transitions = stored(database, rid)
        expected = {"pauser": "paused", "aborter": "aborting"}[winners[0]]
        assert rollout.state == expected
        assert rollout.reason == winners[0]
        assert [(t.to_state, t.actor) for t in transitions] == [(expected, winners[0])]
    with database.session() as session:
        count = session.scalar(select(func.count()).select_from(RolloutTransition))
    assert count == 4
