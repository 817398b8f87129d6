"""The rollout state machine: states, events and the transition table.

`RolloutState` is the type of the state columns, so it is defined with the
tables (`edgefleet.server.db.models`) and exported from here.

    created --START--> running --ADVANCE--> running (next stage)
                       running --COMPLETE--> completed
                       running --PAUSE--> paused --RESUME--> running
             running | paused --ABORT--> aborting --ROLLED_BACK--> aborted
                       running --GATE_FAILED--> aborting, or paused (plan.on_gate_failure)

Invariants:
- a rollout's state changes only through `apply_event`, which writes the new
  state and a `RolloutTransition` row in the caller's unit of work: the history
  never disagrees with the state;
- the change is one conditional UPDATE (`... WHERE id = :id AND state = :from
  AND stage_index = :stage`), so of two concurrent events read from the same
  state (an operator's pause and another's abort, two replicas' advances)
  exactly one wins and the other gets `RolloutStateError`; no lock is held
  between reading the rollout and changing it;
- `created` is virtual: a rollout row exists in it only inside the unit of work
  that starts it, and the START transition row records it as `from_state`.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from edgefleet.server.db.models import Rollout, RolloutState, RolloutTransition
from edgefleet.server.errors import RolloutStateError


class RolloutEvent(str, enum.Enum):
    START = "start"
    ADVANCE = "advance"  # the current stage passed its gates; the next one begins
    COMPLETE = "complete"  # the last stage passed its gates
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    GATE_FAILED = "gate_failed"  # a gate failed: abort or pause, per the plan
    ROLLED_BACK = "rolled_back"  # every device that took the bundle is back (or gone)


# One row per transition. GATE_FAILED names its default target; a plan with
# on_gate_failure "pause" takes it to PAUSED instead (GATE_FAILURE_TARGETS).
TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (RolloutState.CREATED, RolloutEvent.START): RolloutState.RUNNING,
    (RolloutState.RUNNING, RolloutEvent.ADVANCE): RolloutState.RUNNING,
    (RolloutState.RUNNING, RolloutEvent.COMPLETE): RolloutState.COMPLETED,
    (RolloutState.RUNNING, RolloutEvent.PAUSE): RolloutState.PAUSED,
    (RolloutState.PAUSED, RolloutEvent.RESUME): RolloutState.RUNNING,
    (RolloutState.RUNNING, RolloutEvent.ABORT): RolloutState.ABORTING,
    (RolloutState.PAUSED, RolloutEvent.ABORT): RolloutState.ABORTING,
    (RolloutState.RUNNING, RolloutEvent.GATE_FAILED): RolloutState.ABORTING,
    (RolloutState.ABORTING, RolloutEvent.ROLLED_BACK): RolloutState.ABORTED,
}

GATE_FAILURE_TARGETS: dict[str, RolloutState] = {
    "abort": RolloutState.ABORTING,
    "pause": RolloutState.PAUSED,
}

# States the driver works on and an operator can still change (a device takes part in
# at most one rollout in them), and the end.
ACTIVE_STATES = frozenset({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTING})
FINAL_STATES = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED})

# What an error message says the caller tried to do.
_VERBS = {
    RolloutEvent.START: "start",
    RolloutEvent.ADVANCE: "advance",
    RolloutEvent.COMPLETE: "complete",
    RolloutEvent.PAUSE: "pause",
    RolloutEvent.RESUME: "resume",
    RolloutEvent.ABORT: "abort",
    RolloutEvent.GATE_FAILED: "fail a gate",
    RolloutEvent.ROLLED_BACK: "finish rolling back",
}

# Events whose reason becomes Rollout.reason ("why it paused, aborted or failed");
# RESUME and START clear it, the others leave it as it was.
_SETS_REASON = frozenset({RolloutEvent.PAUSE, RolloutEvent.ABORT, RolloutEvent.GATE_FAILED})
_CLEARS_REASON = frozenset({RolloutEvent.START, RolloutEvent.RESUME})


def next_state(
    state: RolloutState, event: RolloutEvent, *, on_gate_failure: str = "abort"
) -> RolloutState | None:
    """The state `event` leads to from `state`, or None when the table has no such row."""
    target = TRANSITIONS.get((state, event))
    if target is not None and event is RolloutEvent.GATE_FAILED:
        return GATE_FAILURE_TARGETS.get(on_gate_failure, RolloutState.ABORTING)
    return target


def allowed_events(state: RolloutState) -> list[RolloutEvent]:
    """The events the table accepts in `state` (e.g. which buttons a page offers)."""
    return [event for (source, event) in TRANSITIONS if source is state]


def _stage_count(rollout: Rollout) -> int:
    stages = rollout.plan.get("stages") if isinstance(rollout.plan, dict) else None
    return len(stages) if isinstance(stages, list) else 0


def apply_event(
    session: Session,
    rollout: Rollout,
    event: RolloutEvent,
    *,
    actor: str,
    reason: str,
    now: dt.datetime,
) -> Rollout:
    """Move `rollout` by `event` within the unit of work `session`.

    Updates state, stage_index (START: 0, ADVANCE: +1), stage_started_at (START,
    ADVANCE), updated_at and reason with one UPDATE conditional on the state
    and stage read into `rollout`, and adds the `RolloutTransition` row. The
    caller commits (or rolls back: then neither is kept).

    Raises:
        RolloutStateError: the table has no row for (state, event), e.g.
            "rollout 3 is aborted; cannot pause"; ADVANCE from the last stage or
            COMPLETE before it; or the row changed since it was read ("changed
            concurrently"), in which case nothing was written.
    """
    source = rollout.state
    plan = rollout.plan if isinstance(rollout.plan, dict) else {}
    on_gate_failure = str(plan.get("on_gate_failure", "abort"))
    target = next_state(source, event, on_gate_failure=on_gate_failure)
    if target is None:
        raise RolloutStateError(f"rollout {rollout.id} is {source}; cannot {_VERBS[event]}")

    stages = _stage_count(rollout)
    stage_index = rollout.stage_index
    stage_started_at = rollout.stage_started_at
    if event is RolloutEvent.START:
        stage_index, stage_started_at = 0, now
    elif event is RolloutEvent.ADVANCE:
        if stage_index + 1 >= stages:
            raise RolloutStateError(
                f"rollout {rollout.id} is at its last stage ({stage_index + 1} of {stages}); "
                "cannot advance (complete it instead)"
            )
        stage_index, stage_started_at = stage_index + 1, now
    elif event is RolloutEvent.COMPLETE and stage_index + 1 < stages:
        raise RolloutStateError(
            f"rollout {rollout.id} is at stage {stage_index + 1} of {stages}; cannot complete"
        )
    if event in _SETS_REASON:
        new_reason: str | None = reason
    elif event in _CLEARS_REASON:
        new_reason = None
    else:
        new_reason = rollout.reason

    values = {
        "state": target,
        "stage_index": stage_index,
        "stage_started_at": stage_started_at,
        "updated_at": now,
        "reason": new_reason,
    }
    result = session.execute(
        update(Rollout)
        .where(
            Rollout.id == rollout.id,
            Rollout.state == source,
            Rollout.stage_index == rollout.stage_index,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        raise RolloutStateError(
            f"rollout {rollout.id} changed concurrently (it was {source}); "
            f"cannot {_VERBS[event]}: read it again"
        )
    # The row already holds these values: mark them persisted, not dirty.
    for key, value in values.items():
        set_committed_value(rollout, key, value)
    session.add(
        RolloutTransition(
            rollout_id=rollout.id,
            at=now,
            from_state=source,
            to_state=target,
            stage_index=stage_index,
            actor=actor,
            reason=reason,
        )
    )
    return rollout


__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "GATE_FAILURE_TARGETS",
    "TRANSITIONS",
    "RolloutEvent",
    "RolloutState",
    "allowed_events",
    "apply_event",
    "next_state",
]
