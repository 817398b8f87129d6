"""What a predictor serves, for `agent status` and the local API's model info and health views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.agent.inference.loaded import LoadedVersion, Step
from edgefleet.agent.inference.timing import CallLimit

if TYPE_CHECKING:
    from edgefleet.agent.inference.shadow import Challenger


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    directory: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    notes: list[str]

    @classmethod
    def of(cls, version: LoadedVersion) -> VersionInfo:
        return cls(
            name=version.name,
            version=version.version,
            directory=str(version.directory),
            format=version.schema.format,
            inputs=[spec.model_dump() for spec in version.schema.inputs],
            outputs=[spec.model_dump() for spec in version.schema.outputs],
            notes=list(version.notes),
        )


@dataclass(frozen=True)
class StepInfo:
    """One step of the fallback chain: its model, breaker, answers and failures by kind."""

    step: str  # primary | float | previous
    model: str  # name@version
    file: str
    loaded: bool
    breaker: str  # closed | open | half-open
    breaker_opened: int
    answered: int
    failures: dict[str, int]  # error | nan | timeout | schema -> count
    # A call of n samples is stopped after timeout_ms + n x timeout_per_sample_ms.
    timeout_ms: float
    timeout_per_sample_ms: float
    load_error: str | None = None  # why its model does not load (None: loaded or not tried)

    @classmethod
    def of(
        cls,
        position: str,
        version: LoadedVersion,
        step: Step,
        answered: int,
        failures: Mapping[tuple[str, str], int],
        limit: CallLimit,
    ) -> StepInfo:
        return cls(
            step=position,
            model=version.label,
            file=step.which,
            loaded=step.is_loaded,
            breaker=step.breaker.state.value,
            breaker_opened=step.breaker.opened,
            answered=answered,
            failures={kind: n for (where, kind), n in failures.items() if where == position},
            timeout_ms=limit.floor_ms,
            timeout_per_sample_ms=round(limit.per_sample_ms, 3),
            load_error=None if step.is_loaded else step.load_error,
        )


@dataclass(frozen=True)
class ModelInfo:
    current: VersionInfo | None
    previous: VersionInfo | None
    steps: list[StepInfo]
    has_default: bool
    default_answers: int
    challenger: str | None = None
    shadow: dict[str, int] = field(default_factory=dict)

    @property
    def fallbacks(self) -> int:
        """Answers that did not come from the primary model."""
        return self.default_answers + sum(s.answered for s in self.steps if s.step != "primary")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return asdict(self)

    def health(self) -> tuple[str, str | None]:
        """The serving health, as `/v1/health` and `agent status` say it: `ok`, `no-model`
        (nothing installed, no default answer), or `degraded` with what is wrong and what
        answers instead ("serving previous (demo@1.0.0), current does not load: ...")."""
        if not self.steps:
            return ("ok", "answering default answers") if self.has_default else ("no-model", None)
        primary = self.steps[0]
        if primary.load_error is not None:
            problem = f"current does not load: {primary.load_error}"
        elif primary.breaker != "closed":
            problem = f"the breaker of the primary step ({primary.model}) is {primary.breaker}"
        else:
            return "ok", None
        standing = next(
            (s for s in self.steps[1:] if s.breaker != "open" and s.load_error is None), None
        )
        if standing is not None:
            serving = f"serving {standing.step} ({standing.model})"
        elif self.has_default:
            serving = "serving default answers"
        else:
            serving = "nothing else can answer"
        return "degraded", f"{serving}, {problem}"


def describe(
    current: LoadedVersion | None,
    previous: LoadedVersion | None,
    steps: Sequence[StepInfo],
    *,
    default_answers: int,
    has_default: bool,
    challenger: Challenger | None,
) -> ModelInfo:
    return ModelInfo(
        current=VersionInfo.of(current) if current is not None else None,
        previous=VersionInfo.of(previous) if previous is not None else None,
        steps=list(steps),
        has_default=has_default,
        default_answers=default_answers,
        challenger=challenger.version.label if challenger is not None else None,
        shadow=asdict(challenger.stats) if challenger is not None else {},
    )
