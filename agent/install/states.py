"""The install state machine as data: states, events, the transition and resume tables.

Pure: no I/O, so the tables are tested on their own. Beside them, the table of
handlers (`handlers.HANDLERS`: a state's work, naming the event); `engine.py`
runs them.

A directive is verified before the machine starts (nothing is persisted for a
refused one, as python-tuf stores nothing it has not verified), so there is no
"verifying directive" state. Profile and agent version are checked with the
bundle's signatures in VERIFYING (the core's bundle verifier raises its own
errors); CHECKING is what only this device can tell: runtime, disk, memory.

A shadow install (a directive with `shadow: true`) takes the install's path
up to SMOKE_TESTING, whose handler then names SHADOW instead of DONE: in
SHADOWING the staged version becomes the challenger (persisted in state.json,
handed to the predictor), `current` and `previous` are never touched, and the
machine rests in COMMITTED with a reason saying the bundle runs in shadow.
COMMITTED rather than a resting state of its own: "the directive was carried
out"; what is served and what runs in shadow are in the status beside it.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    IDLE = "idle"  # nothing was ever installed by this agent
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    CHECKING = "checking"
    STAGING = "staging"
    SMOKE_TESTING = "smoke_testing"
    ACTIVATING = "activating"
    HEALTH_CHECKING = "health_checking"
    SHADOWING = "shadowing"  # the staged version becomes the challenger; current unchanged
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class Event(str, enum.Enum):
    INSTALL = "install"  # a verified directive or a bundle file to install
    ROLLBACK = "rollback"  # a verified rollback directive, or `agent rollback`
    # Input refused before anything changed: a bundle that fails verification (any
    # UntrustedInputError), a version below its security floor, a shadow directive
    # on a device serving nothing. The machine rests as before (see `refused_state`).
    REFUSE = "refuse"
    DONE = "done"  # the state's handler succeeded
    SHADOW = "shadow"  # a shadow install passed its smoke test: run it beside, never serve it
    RETRY = "retry"  # a transient error with attempts left
    FAIL = "fail"  # a fatal error, attempts exhausted, or the store counter over its cap
    ALREADY_CURRENT = "already_current"  # the bundle is the version being served
    REVERTED = "reverted"  # a failed install was rolled back


# States in which the machine rests; a new install or rollback may start from each.
TERMINAL = frozenset({State.IDLE, State.COMMITTED, State.FAILED})

S, E = State, Event

# One row per transition, as in the Mender client (docs/design.md, house style).
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.INSTALL): S.DOWNLOADING,
    (S.IDLE, E.ROLLBACK): S.ROLLING_BACK,
    (S.COMMITTED, E.INSTALL): S.DOWNLOADING,
    (S.COMMITTED, E.ROLLBACK): S.ROLLING_BACK,
    (S.FAILED, E.INSTALL): S.DOWNLOADING,
    (S.FAILED, E.ROLLBACK): S.ROLLING_BACK,
    (S.DOWNLOADING, E.DONE): S.VERIFYING,
    (S.DOWNLOADING, E.RETRY): S.DOWNLOADING,
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.VERIFYING, E.DONE): S.CHECKING,
    (S.VERIFYING, E.FAIL): S.FAILED,
    (S.CHECKING, E.DONE): S.STAGING,
    (S.CHECKING, E.FAIL): S.FAILED,
    (S.STAGING, E.DONE): S.SMOKE_TESTING,
    (S.STAGING, E.ALREADY_CURRENT): S.COMMITTED,
    (S.STAGING, E.FAIL): S.FAILED,
    (S.SMOKE_TESTING, E.DONE): S.ACTIVATING,
    (S.SMOKE_TESTING, E.SHADOW): S.SHADOWING,
    (S.SMOKE_TESTING, E.FAIL): S.FAILED,
    (S.SHADOWING, E.DONE): S.COMMITTED,  # the reason says it runs in shadow
    (S.SHADOWING, E.FAIL): S.ROLLING_BACK,  # the challenger it replaced comes back
    (S.ACTIVATING, E.DONE): S.HEALTH_CHECKING,
    (S.ACTIVATING, E.FAIL): S.ROLLING_BACK,
    (S.HEALTH_CHECKING, E.DONE): S.COMMITTED,
    (S.HEALTH_CHECKING, E.FAIL): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.DONE): S.COMMITTED,  # a requested rollback
    (S.ROLLING_BACK, E.REVERTED): S.FAILED,  # a failed install, undone
    (S.ROLLING_BACK, E.FAIL): S.FAILED,  # the version to go back to is gone
}

# Where a state persisted before a restart continues. Every state not listed
# here rolls back; `resume_state` adds the guards on where `current` points.
RESUME: dict[State, State] = {
    S.DOWNLOADING: S.DOWNLOADING,  # the transport resumes its partial file
    S.VERIFYING: S.VERIFYING,  # VERIFYING..SMOKE_TESTING are idempotent: verify again
    S.CHECKING: S.VERIFYING,
    S.STAGING: S.VERIFYING,
    S.SMOKE_TESTING: S.VERIFYING,
    S.ACTIVATING: S.ACTIVATING,  # completes (activate is idempotent) if current is from/to
    S.HEALTH_CHECKING: S.HEALTH_CHECKING,  # checks again from the start if current is `to`
    S.SHADOWING: S.SHADOWING,  # hands the challenger over again (idempotent; current untouched)
    S.ROLLING_BACK: S.ROLLING_BACK,  # completes (restore is absolute)
}

# States after which `current` may already name the new version.
SWITCHED = frozenset({State.ACTIVATING, State.HEALTH_CHECKING})

# Where REFUSE may happen: at rest (a directive or rollback refused before it
# starts) and in every state before anything is switched or handed over.
REFUSABLE = TERMINAL | {S.DOWNLOADING, S.VERIFYING, S.CHECKING, S.STAGING, S.SMOKE_TESTING}

# The `install_state` of the status report of a refusal. Not a state: the
# machine rests where `refused_state` says, and heartbeats report that.
REFUSED = "refused"


class TransitionError(RuntimeError):
    """The machine asked for a transition the table does not have: a bug, not an input."""


def next_state(state: State, event: Event) -> State:
    """Raises: TransitionError when (state, event) is not a row of TRANSITIONS."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state.value} on {event.value}") from None


def refused_state(state: State, serving: bool) -> State:
    """Where REFUSE in `state` leads: a refusal changes nothing on the device, so the
    machine rests as any device serving its version does (COMMITTED), or IDLE when
    it serves nothing.

    Raises: TransitionError when `state` is past the point where nothing changed.
    """
    if state not in REFUSABLE:
        raise TransitionError(f"no transition from {state.value} on {Event.REFUSE.value}")
    return State.COMMITTED if serving else State.IDLE


def resume_state(
    persisted: State, current: str | None, from_version: str | None, to_version: str | None
) -> State | None:
    """Where to continue after a restart found `persisted`; None when at rest.

    ACTIVATING continues only while `current` names the version it switched from
    or to, and HEALTH_CHECKING only while `current` names the new version: if
    anything else moved the link, the install rolls back to what it recorded.
    """
    if persisted in TERMINAL:
        return None
    target = RESUME.get(persisted, State.ROLLING_BACK)
    if target is State.ACTIVATING and current not in (from_version, to_version):
        return State.ROLLING_BACK
    if target is State.HEALTH_CHECKING and current != to_version:
        return State.ROLLING_BACK
    return target
