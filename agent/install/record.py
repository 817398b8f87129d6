"""state.json: what the install state machine persists before each state's handler runs.

Format (versioned by `format`; a newer format is refused, never guessed at):

    {"format": 4, "state": "downloading", "store_count": 3, "report_sequence": 17,
     "last_directive_sequence": 12, "security_floors": {"demo": 1000001000000},
     "trust_root": "{...the trust root document...}", "fleet_timestamp_sequence": 40,
     "challenger": "demo@1.2.0-0123456789ab",
     "install": {...InstallRecord, or null when no install ever started...}}

- `store_count` counts the writes of the current install or rollback (reset
  when one starts); above MAX_STORE_COUNT the machine fails instead of looping.
- `report_sequence` is the `sequence` of the last status report (per device).
- `last_directive_sequence` is the highest directive sequence accepted; it is
  written with the first state of the directive's install, before any action.
- `security_floors` maps a model name to the lowest release counter of that
  name this device runs: installs and rollbacks to a version below it are
  refused. Only a release key raises it: a release whose signed manifest states
  a `security_floor` raises its name's floor to that value when it COMMITS
  (after its health check; a shadow install does not, its promotion does). It
  never falls.
- `trust_root` (the trusted trust root document, as text), `last_directive_sequence`,
  `fleet_timestamp_sequence` and `security_floors` are the device's trust
  (`edgefleet.devicetrust.DeviceTrust`), persisted here so that a newer root and
  the counters it checks are written with the install state in one atomic write.
  A newer root is written before anything trusts it; `fleet_timestamp_sequence`
  is the highest fleet timestamp sequence accepted, so that after a restart an
  older timestamp is refused.
- `challenger` is the version running in shadow beside `current` (its id under
  versions/, which pruning spares), or null. It is written with the state that
  changes it, before that state's handler tells the predictor: SHADOWING sets
  it, ACTIVATING the same version (a promotion) and a requested rollback clear
  it, and ROLLING_BACK a failed install restores the one the install started
  with (`InstallRecord.challenger_on_entering`).

Formats 1 (before shadow installs), 2 (before floors per name) and 3 (before
the trust root and the fleet timestamp sequence) are read as format 4, without
a trust root (the installer's, from state/trust/root.json or else the flashed
file, is written with the next state) and with a fleet timestamp sequence of 0.
Formats 1 and 2 are also without a challenger, and their single `security_floor`
(then the highest counter ever committed, which no release key chose) becomes
the floor of the model name the device serves, lowered to the counter of
`previous` when that is a version of the same model, so that the rollback the
device could do before the upgrade still works. An agent that reads only older
formats refuses a newer file rather than guess.

Written with `atomic_write_bytes` (temp file, fsync, rename, fsync of the
directory): a reader sees the previous write or this one, never a part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.errors import InstallError
from edgefleet.agent.install.states import State
from edgefleet.agent.layout import PRIVATE_FILE
from edgefleet.devicetrust import TrustSnapshot
from edgefleet.fileio import atomic_write_bytes
from edgefleet.semver import MAX_RELEASE_COUNTER
from edgefleet.validation import describe_validation_error

STATE_FORMAT = 4
# 1: written before shadow installs; 2: before floors per model name; 3: before the trust root
READABLE_FORMATS = frozenset({1, 2, 3, 4})
MAX_STORE_COUNT = 40  # a full install with every retry stores ~20 times
MAX_RESUMES = 3  # restarts within one install before it rolls back instead


class InstallRecord(BaseModel):
    """One install (or rollback) in flight or just finished."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["install", "rollback"]
    started_at: str
    directive: dict[str, Any] | None = None  # the verified signed part, for resuming
    directive_sequence: int | None = None
    source_file: str | None = None  # `agent install FILE`
    bundle_name: str | None = None
    bundle_version: str | None = None
    sha256: str | None = None  # of the bundle file (from the directive, or hashed on copy)
    length: int | None = None
    download: str | None = None  # the complete bundle file under downloads/
    from_version: str | None = None  # `current` when the install started
    from_previous: str | None = None  # `previous` when the install started
    from_challenger: str | None = None  # the challenger when the install started
    shadow: bool = False  # run beside `current` as the challenger, never serve it
    to_version: str | None = None
    release_counter: int | None = None
    security_floor: int | None = None  # the floor the bundle's manifest states
    files_bytes: int | None = None  # what extracting takes on disk
    served_model: str | None = None
    served_bytes: int | None = None
    attempts: int = Field(default=0, ge=0)  # failed download attempts
    resumes: int = Field(default=0, ge=0)
    baseline_requests: int | None = None  # traffic before activation, for the latency check
    baseline_p95_ms: float | None = None
    reason: str | None = None  # why it failed, or the health check's note
    refused: str | None = None  # the error code when it was refused: nothing changed
    keep_partial: bool = False  # a download failed: keep the transport's partial file

    def is_promotion(self) -> bool:
        """A normal install of the version running in shadow: it is served from now on."""
        return (
            not self.shadow
            and self.to_version is not None
            and (self.to_version == self.from_challenger)
        )

    def challenger_on_entering(self, target: State, challenger: str | None) -> str | None:
        """The challenger to persist with `target`, when `challenger` is persisted now.

        SHADOWING makes the staged version the challenger; ACTIVATING a promotion
        ends its shadow run; ROLLING_BACK undoes an install (challenger included)
        or, for a requested rollback, stops the challenger. Any other state
        leaves it as it is.
        """
        if target is State.SHADOWING:
            return self.to_version
        if target is State.ACTIVATING and self.is_promotion():
            return None
        if target is State.ROLLING_BACK:
            return self.from_challenger if self.kind == "install" else None
        return challenger

    def floors_on_entering(self, target: State, floors: dict[str, int]) -> dict[str, int]:
        """The security floors to persist with `target`: a served release that commits
        raises its name's floor to the one its manifest states (never lowers it)."""
        name, stated = self.bundle_name, self.security_floor
        served = self.kind == "install" and not self.shadow and self.refused is None
        if target is not State.COMMITTED or not served or name is None or stated is None:
            return floors
        return {**floors, name: max(floors.get(name, 0), stated)}


class StateFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[4] = 4  # STATE_FORMAT
    state: State = State.IDLE
    store_count: int = Field(default=0, ge=0)
    report_sequence: int = Field(default=0, ge=0)
    last_directive_sequence: int = Field(default=0, ge=0)
    security_floors: dict[str, Annotated[int, Field(ge=0, le=MAX_RELEASE_COUNTER)]] = Field(
        default_factory=dict
    )
    trust_root: str | None = None  # None only when read from an older format
    fleet_timestamp_sequence: int = Field(default=0, ge=0)
    challenger: str | None = None  # the version running in shadow beside `current`
    install: InstallRecord | None = None

    def floor_of(self, name: str) -> int:
        """The lowest release counter of model `name` this device runs (0: no floor)."""
        return self.security_floors.get(name, 0)

    def trust_snapshot(self, fallback_root: bytes) -> TrustSnapshot:
        """The device's trust as persisted; `fallback_root` when an older format held none."""
        root = self.trust_root.encode("utf-8") if self.trust_root is not None else fallback_root
        return TrustSnapshot(
            root=root,
            directive_sequence=self.last_directive_sequence,
            timestamp_sequence=self.fleet_timestamp_sequence,
            security_floors=dict(self.security_floors),
        )

    def with_trust(self, snapshot: TrustSnapshot) -> StateFile:
        """This state carrying `snapshot` (written with it in one atomic write)."""
        return self.model_copy(
            update={
                "trust_root": snapshot.root.decode("utf-8"),
                "last_directive_sequence": snapshot.directive_sequence,
                "fleet_timestamp_sequence": snapshot.timestamp_sequence,
                "security_floors": dict(snapshot.security_floors),
            }
        )


def load_state(
    path: Path, served_name: str | None = None, rollback_counter: int | None = None
) -> StateFile:
    """The persisted state; a fresh one when the file does not exist.

    `served_name`, the model name the device serves, receives the single
    `security_floor` of a format 1 or 2 file (without one, the name of its last
    install does), capped at `rollback_counter`, the counter of the previous
    version of that model (see the module docstring).

    Raises:
        InstallError: unreadable, not JSON, another format, or invalid. The file is
            left as it is for an operator to look at (it never is half-written).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return StateFile()
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise InstallError(f"{path} is not JSON: {exc}") from exc
    found = raw.get("format") if isinstance(raw, dict) else None
    if type(found) is not int or found not in READABLE_FORMATS:
        raise InstallError(
            f"{path} has format {found!r}; this agent reads formats "
            f"{', '.join(map(str, sorted(READABLE_FORMATS)))}: was it written by a newer agent?"
        )
    if found < STATE_FORMAT:
        raw = _upgrade(raw, served_name, rollback_counter)
    try:
        return StateFile.model_validate(raw)
    except ValidationError as exc:
        raise InstallError(f"{path}: {describe_validation_error(exc, 'state')}") from exc


def _upgrade(
    raw: dict[str, Any], served_name: str | None, rollback_counter: int | None
) -> dict[str, Any]:
    """A format 1, 2 or 3 state as format 4 (see the module docstring)."""
    upgraded = {k: v for k, v in raw.items() if k != "security_floor"}
    upgraded["format"] = STATE_FORMAT
    if raw.get("format") == 3:  # its floors are per name already
        return upgraded
    floor = raw.get("security_floor", 0)
    if rollback_counter is not None and isinstance(floor, int):
        floor = min(floor, rollback_counter)
    install = raw.get("install")
    name = served_name or (install.get("bundle_name") if isinstance(install, dict) else None)
    upgraded["security_floors"] = {name: floor} if name and floor else {}
    return upgraded


def save_state(path: Path, state: StateFile) -> None:
    data = state.model_dump_json(indent=1).encode("utf-8") + b"\n"
    atomic_write_bytes(path, data, mode=PRIVATE_FILE)
