"""Rollouts: plans, stage gates, the rollout state machine, device selection.

The rules are pure (`plan`, `gates`, `selection`) or touch only the rollout
row and its history (`machine`); the service and the driver that apply them
to the fleet live beside them (`service`, `progress`, `membership`; the driver
by phase: `driver`, `step`, `running`, `joining`, `notify`, `aborting`,
`publication`).
"""

from edgefleet.server.rollouts.gates import (
    GateCheck,
    GateDecision,
    StageCounts,
    Verdict,
    evaluate_stage,
)
from edgefleet.server.rollouts.machine import (
    ACTIVE_STATES,
    FINAL_STATES,
    TRANSITIONS,
    RolloutEvent,
    RolloutState,
    allowed_events,
    apply_event,
    next_state,
)
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
from edgefleet.server.rollouts.selection import (
    format_selector,
    matches,
    order_selection,
    parse_selector,
)

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "TRANSITIONS",
    "GateCheck",
    "GateDecision",
    "GateOverrides",
    "Gates",
    "Plan",
    "RolloutEvent",
    "RolloutState",
    "Stage",
    "StageCounts",
    "Verdict",
    "allowed_events",
    "apply_event",
    "evaluate_stage",
    "format_selector",
    "load_plan",
    "matches",
    "next_state",
    "order_selection",
    "parse_selector",
    "plan_from_dict",
    "plan_to_dict",
    "stage_targets",
]
