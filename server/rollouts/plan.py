"""Rollout plans: the stages a bundle goes through and the gates between them.

A plan is a list of stages whose sizes are cumulative: `{percent: 10}` then
`{percent: 50}` means "10% of the selection, then 50% in all". A stage names
its devices (`devices: [...]`, canaries), gives a count, or gives a percent of
the selection. The plan is validated as a whole before a rollout starts, so an
impossible plan is refused with one line naming the field rather than
discovered halfway through:

- sizes of the same kind grow from stage to stage, and a count exceeds the
  named devices before it;
- the last stage is `{percent: 100}` and no stage follows a 100% stage: a
  plan whose last stage covers part of the selection is refused rather than
  completed with an implied 100% stage, because the operator may have meant
  to stop there (and a rollout never "completes" for part of its selection);
- a shadow stage is never last (shadow devices do not serve the new version);
- a device is named once in the whole plan.

Gate values are checked by their fields (shares within 0..1, `min_success_share`
above 0); no number may be infinite or NaN (JSON bodies may carry them).
`min_success_share + max_failure_share > 1` is allowed: a stage whose devices
have all finished below the success share fails (see `gates.py`), so no pair
of values leaves a stage waiting forever. `max_drift` and `max_accuracy_drop`
are off (None) unless set; a stage cannot turn off a gate the plan sets.

Pure: no I/O and no database. The plan stored with a rollout is
`plan_to_dict(plan)` (JSON, every default filled in) and read back with
`plan_from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from itertools import islice
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edgefleet.plantext import parse_plan_text
from edgefleet.server.errors import InvalidRequestError
from edgefleet.validation import describe_validation_error

MAX_STAGES = 20
MAX_NAMED_DEVICES = 1000  # per stage
DeviceName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Gates(BaseModel):
    """What a stage must show before the next one starts (defaults for every stage)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    min_success_share: float = Field(default=0.9, gt=0.0, le=1.0)
    max_failure_share: float = Field(default=0.1, ge=0.0, le=1.0)
    min_reporting: int = Field(default=0, ge=0)
    bake_s: float = Field(default=60.0, ge=0.0, le=7 * 86400.0)
    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    max_fallback_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    max_latency_p95_ratio: float = Field(default=1.5, gt=0.0)
    min_shadow_agreement: float = Field(default=0.95, ge=0.0, le=1.0)
    min_requests: int = Field(default=20, ge=1)
    max_drift: float | None = Field(default=None, ge=0.0, le=1.0)
    max_accuracy_drop: float | None = Field(default=None, ge=0.0, le=1.0)
    min_labels: int = Field(default=50, ge=1)


class GateOverrides(BaseModel):
    """A stage's own gate values; a field left out takes the plan's value."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    min_success_share: float | None = Field(default=None, gt=0.0, le=1.0)
    max_failure_share: float | None = Field(default=None, ge=0.0, le=1.0)
    min_reporting: int | None = Field(default=None, ge=0)
    bake_s: float | None = Field(default=None, ge=0.0, le=7 * 86400.0)
    max_error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_fallback_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_latency_p95_ratio: float | None = Field(default=None, gt=0.0)
    min_shadow_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    min_requests: int | None = Field(default=None, ge=1)
    max_drift: float | None = Field(default=None, ge=0.0, le=1.0)
    max_accuracy_drop: float | None = Field(default=None, ge=0.0, le=1.0)
    min_labels: int | None = Field(default=None, ge=1)


class Stage(BaseModel):
    """One stage: named devices, a count or a percent of the selection (cumulative)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    name: str | None = Field(default=None, min_length=1, max_length=64)
    devices: list[DeviceName] | None = Field(
        default=None, min_length=1, max_length=MAX_NAMED_DEVICES
    )
    count: int | None = Field(default=None, ge=1)
    percent: float | None = Field(default=None, gt=0.0, le=100.0)
    shadow: bool = False
    gates: GateOverrides | None = None

    @model_validator(mode="after")
    def _one_size(self) -> Stage:
        given = [k for k in ("devices", "count", "percent") if getattr(self, k) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"a stage needs exactly one of devices, count, percent (got {found})")
        return self


class Plan(BaseModel):
    """A validated rollout plan (see the module docstring for what is refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    rate_limit_per_minute: int = Field(default=600, ge=1, le=1_000_000)
    device_timeout_s: int = Field(default=1800, ge=1, le=30 * 86400)
    max_retries: int = Field(default=2, ge=0, le=100)
    on_gate_failure: Literal["abort", "pause"] = "abort"
    gates: Gates = Gates()

    @model_validator(mode="after")
    def _possible(self) -> Plan:
        _check_stages(self.stages)
        return self

    def stage_gates(self, index: int) -> Gates:
        """The gates of stage `index`: the plan's, with the stage's overrides applied.

        Raises:
            IndexError: no such stage.
        """
        overrides = self.stages[index].gates
        if overrides is None:
            return self.gates
        # Each override field carries the same bounds as the Gates field it replaces, so
        # the merge is valid without validating again.
        return self.gates.model_copy(update=overrides.model_dump(exclude_none=True))

    def stage_name(self, index: int) -> str:
        """The stage's name, or `stage N` (1-based) when it has none."""
        return self.stages[index].name or f"stage {index + 1}"


def _check_stages(stages: Sequence[Stage]) -> None:
    """Raises: ValueError naming the first stage that makes the plan impossible."""
    named: set[str] = set()
    names: set[str] = set()
    last_count: int | None = None
    last_percent: float | None = None
    for i, stage in enumerate(stages):
        where = f"stages.{i}"
        if stage.name is not None:
            if stage.name in names:
                raise ValueError(f"{where}.name: {stage.name!r} names an earlier stage too")
            names.add(stage.name)
        if last_percent == 100.0:
            raise ValueError(f"{where}: follows a 100% stage, which already covers everyone")
        if stage.devices is not None:
            for device in stage.devices:
                if device in named:
                    raise ValueError(f"{where}.devices: {device!r} is named twice")
                named.add(device)
        elif stage.count is not None:
            floor = max(last_count or 0, len(named))
            if stage.count <= floor:
                raise ValueError(
                    f"{where}.count: {stage.count} does not exceed the {floor} devices "
                    "of earlier stages (counts are cumulative)"
                )
            last_count = stage.count
        else:
            assert stage.percent is not None
            if last_percent is not None and stage.percent <= last_percent:
                raise ValueError(
                    f"{where}.percent: {stage.percent:g} does not exceed the {last_percent:g} "
                    "of an earlier stage (percents are cumulative)"
                )
            last_percent = stage.percent
    last = stages[-1]
    where = f"stages.{len(stages) - 1}"
    if last.shadow:
        raise ValueError(f"{where}: the last stage cannot be a shadow stage")
    if last.percent != 100.0:
        raise ValueError(
            f"{where}: the last stage must cover the whole selection; "
            "add a final stage {percent: 100} (it is not implied)"
        )


def _invalid(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    if first["loc"]:
        detail = describe_validation_error(exc, "plan")
    else:  # a whole-plan check: its message starts with the stage it names
        detail = first["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"invalid plan: {detail}")


def load_plan(text: str) -> Plan:
    """Parse a plan from YAML or JSON text (JSON is read as YAML; `edgefleet.plantext` says
    what is refused before the plan is looked at: size, aliases, depth, non-finite numbers).

    Raises:
        InvalidRequestError: not YAML, not a mapping, or an impossible plan; the
            message is one line naming the field.
    """
    try:
        raw = parse_plan_text(text)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid plan: {exc}") from None
    return plan_from_dict(raw)


def plan_from_dict(raw: Any) -> Plan:
    """Validate a plan given as parsed JSON (an API body, or `Rollout.plan`).

    Raises:
        InvalidRequestError: not a mapping, or an impossible plan.
    """
    if not isinstance(raw, dict):
        raise InvalidRequestError("invalid plan: expected a mapping with a 'stages' list")
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-safe data with every default filled in (what a rollout stores).

    A stage keeps only the size it was given and the gate overrides it set.
    """
    data = plan.model_dump(mode="json")
    for stage in data["stages"]:
        for key in ("name", "devices", "count", "percent", "gates"):
            if stage[key] is None:
                del stage[key]
        if "gates" in stage:
            stage["gates"] = {k: v for k, v in stage["gates"].items() if v is not None}
    return data


def stage_targets(plan: Plan, selection: Sequence[str]) -> list[list[str]]:
    """The cumulative device ids of each stage, given the ordered selection.

    Named devices belong to their stage. A count or percent stage grows the
    set from the selection in its order (named devices excluded) until it
    holds `count` or `ceil(percent * N / 100)` devices, capped at N, and at
    least one more device than the stage before while any remain (so a small
    selection does not give a stage nothing to do). A stage's own devices are
    `targets[i]` minus `targets[i - 1]`.

    Raises:
        InvalidRequestError: a named device is not in the selection.
    """
    ordered = list(dict.fromkeys(selection))  # drop repeats, keep order
    total = len(ordered)
    present = set(ordered)
    named = [d for stage in plan.stages for d in stage.devices or ()]
    missing = [d for d in named if d not in present]
    if missing:
        shown = ", ".join(repr(d) for d in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidRequestError(
            f"named device(s) {shown}{more} not in the selection "
            "(not enrolled, tags do not match, or the bundle does not support their profile)"
        )
    pool = iter([d for d in ordered if d not in set(named)])
    current: list[str] = []
    targets: list[list[str]] = []
    for stage in plan.stages:
        if stage.devices is not None:
            current = current + list(stage.devices)
        else:
            if stage.count is not None:
                want = min(stage.count, total)
            else:
                assert stage.percent is not None
                want = min(math.ceil(Fraction(repr(stage.percent)) * total / 100), total)
            want = max(want, min(len(current) + 1, total))
            current = current + list(islice(pool, max(0, want - len(current))))
        targets.append(current)
    return targets


__all__ = [
    "GateOverrides",
    "Gates",
    "Plan",
    "Stage",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "stage_targets",
]
