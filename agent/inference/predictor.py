"""The in-process prediction API for applications on the device (`edgefleet.agent.Predictor`).

The fallback chain (docs/design.md): the served model of `current` ("primary",
possibly quantized) -> that bundle's float model ("float") -> the served model
of `previous` ("previous") -> the configured default answer ("default"). A
step fails when it raises, returns NaN or infinity, or passes its call limit
(timing.py: scaled with the batch from the time per sample this device
measured); each failure is counted by step and kind, each answer by the step
that gave it, and each step sits behind a circuit breaker. Steps that do not
exist (no float model, the float model is the served one, nothing previous)
are left out. When every step fails: `InferenceError`; when nothing is
installed and there is no default answer: `NoModelError`. A batch above
`max_batch_samples` is refused before any model runs: `BatchTooLargeError`.

Inputs are checked against the schema of `current` before any model sees
them. `previous` gets them checked again against its own schema when that
differs; a refusal there is that step's failure, not the caller's.

Hot path: `predict` reads the serving state once (an immutable object that
`reload` replaces whole, so a request never sees half of a reload), checks the
inputs, runs the primary model on the caller's thread (watchdog.py explains
why not on a worker thread) and hands telemetry one copy per tensor. No
pydantic, no thread hand-off, no lock on success (the answer counters are
itertools.count), and the breaker and a loaded runner are read without a call.
Measured (bench/predictor.py, figures in docs/agent.md): about 7 us of work in
a warm loop, but 5 to 13 times that between two model calls on the loaded
2-CPU test machine, since the Python and numpy code runs with the caches the
model (and the other work) evicted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from edgefleet.agent.errors import InferenceError, InputSchemaError, NoModelError
from edgefleet.agent.inference.breaker import BreakerState, Clock
from edgefleet.agent.inference.chain import (
    Prediction,
    Serving,
    StepName,
    Tally,
    build_serving,
    split_outputs,
)
from edgefleet.agent.inference.info import ModelInfo, StepInfo, describe
from edgefleet.agent.inference.loaded import (
    LoadedVersion,
    RuntimeSettings,
    Step,
    default_outputs,
    load_default_answer,
    load_version,
)
from edgefleet.agent.inference.runtimes import (
    InferenceTimeoutError,
    ModelRunner,
    outputs_are_finite,
)
from edgefleet.agent.inference.shadow import Challenger
from edgefleet.agent.inference.timing import (
    CallLimit,
    call_limit,
    check_batch_size,
    read_timing,
    sample_count,
)
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import InferenceSettings
from edgefleet.profiles import Profile, load_profile

if TYPE_CHECKING:  # telemetry imports this package (schema.py): no import cycle at run time
    from edgefleet.agent.telemetry import TelemetryRecorder

log = logging.getLogger(__name__)

_CLOSED = BreakerState.CLOSED


class Predictor:
    """Serves the installed model in process; see the module docstring.

    Thread-safe: `predict` may be called from many threads at once, also while
    `reload` runs.
    """

    def __init__(
        self,
        layout: StateLayout,
        settings: InferenceSettings,
        runtime: RuntimeSettings,
        telemetry: TelemetryRecorder | None = None,
        *,
        shadow_seed: int | None = None,
    ) -> None:
        """Use `Predictor.open`. Raises: ConfigError (an unreadable default answer)."""
        self._layout = layout
        self._settings = settings
        self._max_batch = settings.max_batch_samples
        self._runtime = runtime
        self.telemetry = telemetry
        self._default = (
            load_default_answer(settings.default_answer) if settings.default_answer else None
        )
        self._serving = Serving(None, None, (), None)
        self._reload_lock = threading.Lock()
        self._count_lock = threading.Lock()  # failures only: the answers use tallies
        self._answered = {position: Tally() for position in get_args(StepName)}
        self._failures: Counter[tuple[str, str]] = Counter()
        self._rng = random.Random(shadow_seed)
        self._challenger: Challenger | None = None

    @classmethod
    def open(
        cls,
        state: Path | StateLayout,
        settings: InferenceSettings,
        profile: Profile | str,
        telemetry: TelemetryRecorder | None = None,
        *,
        clock: Clock = time.monotonic,
        shadow_seed: int | None = None,
    ) -> Predictor:
        """A predictor serving what the state directory's `current` and `previous` name.

        `clock` drives the circuit breakers; `shadow_seed` makes sampling repeatable.

        Raises:
            ConfigError: the default answer file is unreadable.
            UnknownProfileError: no profile of that name.
        """
        layout = state if isinstance(state, StateLayout) else StateLayout(Path(state))
        if isinstance(profile, str):
            profile = load_profile(profile)
        runtime = RuntimeSettings(
            threads=profile.threads,
            providers=tuple(profile.execution_providers),
            breaker_failures=settings.breaker_failures,
            breaker_reset_seconds=settings.breaker_reset_seconds,
            clock=clock,
        )
        predictor = cls(layout, settings, runtime, telemetry, shadow_seed=shadow_seed)
        predictor.reload()
        return predictor

    # --- serving state ---------------------------------------------------------------------

    def reload(self) -> ModelInfo:
        """Re-read the `current` and `previous` links (after an install or a rollback).

        Versions already loaded are kept as they are (their open models and
        breakers too): after an install the old `current` becomes `previous`
        without loading anything, but each version's call limit is worked out
        again from the timing last measured for it (timing.py). A version whose
        schema cannot be read is left out of the chain and logged; the served
        model of `current` is opened now, and when it fails to open its step
        fails on each request.
        """
        with self._reload_lock:
            old = self._serving
            known = {v.directory: v for v in (old.current, old.previous) if v is not None}
            current = self._load(self._layout.resolve_link(self._layout.current), known)
            previous = self._load(self._layout.resolve_link(self._layout.previous), known)
            if (
                previous is not None
                and current is not None
                and previous.directory == current.directory
            ):
                previous = None
            if current is not None:
                try:
                    current.served.runner()
                except InferenceError as exc:
                    log.error("the current model does not load: %s", exc)
            limits = {v.directory: self._limit(v) for v in (current, previous) if v is not None}
            self._serving = build_serving(current, previous, self._answered, limits)
            if self.telemetry is not None:
                self.telemetry.set_model(
                    current.name if current else None,
                    current.version if current else None,
                    current.reference if current else None,
                )
        return self.model_info()

    def _load(
        self, directory: Path | None, known: dict[Path, LoadedVersion]
    ) -> LoadedVersion | None:
        if directory is None:
            return None
        if directory in known:
            return known[directory]
        try:
            return load_version(directory, self._runtime)
        except InferenceError as exc:
            log.error("version %s is left out of the fallback chain: %s", directory.name, exc)
            return None

    def _limit(self, version: LoadedVersion) -> CallLimit:
        timing = read_timing(self._layout, version.directory.name)
        return call_limit(self._settings, timing.sample_ms)

    # --- predictions -----------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any]) -> Prediction:
        """Answer one request (a batch of one or more samples along the first axis).

        Raises:
            InputSchemaError: the inputs do not match the current model's schema.
            InferenceError: every step of the fallback chain failed.
            NoModelError: nothing is installed and there is no default answer.
        """
        start = time.perf_counter()
        serving = self._serving
        if serving.validator is None:
            feed = self._unchecked(inputs)
        else:
            try:
                feed = serving.validator.validate(inputs)
            except InputSchemaError:
                self._refused()
                raise
        samples = sample_count(feed)
        if samples > self._max_batch:
            self._check_size(samples)
        outputs, step, model = self._answer(serving, inputs, feed, samples)
        prediction = Prediction(outputs, step, model, (time.perf_counter() - start) * 1000.0)
        telemetry = self.telemetry
        if telemetry is not None:
            telemetry.record(prediction, feed, outputs)
        challenger = self._challenger
        if (
            challenger is not None
            and step == "primary"
            and self._rng.random() < self._settings.shadow_sample_rate
        ):
            challenger.submit(feed, outputs)
        return prediction

    def predict_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Prediction]:
        """Answer several requests with one model call; one Prediction per request.

        Each request is checked on its own (the error names its index); the
        model then sees them stacked along the first axis. Telemetry counts
        the call as one request. Requests whose inputs differ in a dynamic
        dimension other than the first cannot be stacked: call `predict`.

        Raises: as `predict`.
        """
        if not requests:
            return []
        start = time.perf_counter()
        serving = self._serving
        checked = []
        for index, request in enumerate(requests):
            try:
                checked.append(self._check(serving, request))
            except InputSchemaError as exc:
                raise InputSchemaError(f"request {index}: {exc}") from exc
        names = list(checked[0])
        sizes = [sample_count(feed) for feed in checked]
        self._check_size(sum(sizes))
        try:
            stacked = {n: np.concatenate([feed[n] for feed in checked]) for n in names}
        except ValueError as exc:
            if self.telemetry is not None:
                self.telemetry.record_schema_violation()
            raise InputSchemaError(f"the requests cannot be stacked into one batch: {exc}") from exc
        outputs, step, model = self._answer(serving, stacked, stacked, sum(sizes))
        latency_ms = (time.perf_counter() - start) * 1000.0
        if self.telemetry is not None:
            self.telemetry.record(Prediction(outputs, step, model, latency_ms), stacked, outputs)
        parts = split_outputs(outputs, sizes)
        return [Prediction(part, step, model, latency_ms) for part in parts]

    def _check(self, serving: Serving, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if serving.validator is None:
            return self._unchecked(inputs)
        try:
            return serving.validator.validate(inputs)
        except InputSchemaError:
            self._refused()
            raise

    def _unchecked(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Nothing loaded to check against: only the default answer can answer."""
        if self._default is None:
            raise NoModelError("no model is installed and no default answer is configured")
        return {k: np.asarray(v) for k, v in inputs.items()}

    def _refused(self) -> None:
        if self.telemetry is not None:
            self.telemetry.record_schema_violation()

    def _check_size(self, samples: int) -> None:
        try:
            check_batch_size(samples, self._settings)
        except InputSchemaError:
            self._refused()
            raise

    def _answer(
        self,
        serving: Serving,
        inputs: Mapping[str, Any],
        feed: dict[str, np.ndarray],
        samples: int,
    ) -> tuple[dict[str, np.ndarray], StepName, str]:
        reasons: list[str] = []
        for entry in serving.steps:
            step, position = entry.step, entry.position
            breaker = step.breaker
            # The common case without a Python call: CLOSED, loaded, no failures to forget.
            if breaker.state is not _CLOSED and not breaker.allow():
                reasons.append(f"{position}: skipped (circuit open)")
                continue
            step_feed = feed
            if entry.revalidate:
                try:
                    step_feed = entry.version.validator.validate(inputs)
                except InputSchemaError as exc:
                    self._failed(step, position, "schema", exc, reasons)
                    continue
            try:
                outputs = (step.loaded or step.runner()).run(
                    step_feed, entry.limit.seconds(samples)
                )
            except InferenceTimeoutError as exc:
                self._failed(step, position, "timeout", exc, reasons)
                continue
            except InferenceError as exc:
                self._failed(step, position, "error", exc, reasons)
                continue
            if not outputs_are_finite(outputs):
                self._failed(step, position, "nan", "NaN or infinite output", reasons)
                continue
            if breaker.state is not _CLOSED or breaker.consecutive:
                breaker.succeeded()
            entry.answered.add()
            return outputs, position, entry.label
        if self._default is not None:
            first = serving.steps[0].version if serving.steps else None
            outputs = default_outputs(
                self._default, samples, first.schema.outputs if first is not None else None
            )
            self._answered["default"].add()
            return outputs, "default", "default"
        if self.telemetry is not None:
            self.telemetry.record_error()
        if not serving.steps:
            raise NoModelError("no model is installed and no default answer is configured")
        raise InferenceError("every step of the fallback chain failed: " + "; ".join(reasons))

    def _failed(
        self, step: Step, position: str, kind: str, reason: object, reasons: list[str]
    ) -> None:
        step.breaker.failed()
        with self._count_lock:
            self._failures[position, kind] += 1
        reasons.append(f"{position}: {kind}: {reason}")
        log.warning("fallback chain: %s step failed (%s): %s", position, kind, reason)

    # --- shadow mode -----------------------------------------------------------------------

    def set_challenger(self, version_dir: Path | None) -> None:
        """Run `version_dir` in shadow on a sampled share of requests (None: stop).

        Raises:
            InferenceError: its schema cannot be read or its model does not load.
        """
        old = self._challenger
        self._challenger = None
        if old is not None:
            old.close()
        if version_dir is None:
            return
        version = load_version(Path(version_dir), self._runtime)
        version.served.runner()
        record = self.telemetry.record_shadow if self.telemetry is not None else None
        self._challenger = Challenger(version, self._limit(version), record)

    def wait_shadow(self, timeout: float | None = None) -> bool:
        """Wait for the challenger's queued comparisons; False on timeout."""
        challenger = self._challenger
        return True if challenger is None else challenger.wait_idle(timeout)

    def close(self) -> None:
        """Stop the challenger's thread. Models are freed with the predictor."""
        self.set_challenger(None)

    # --- what is served ----------------------------------------------------------------------

    def runner(self, step: StepName = "primary") -> ModelRunner:
        """The loaded model of one step of the chain, to run directly (no checks, no chain).

        Raises:
            NoModelError: the chain has no such step now.
            InferenceError: the model does not load.
        """
        for entry in self._serving.steps:
            if entry.position == step:
                return entry.step.runner()
        raise NoModelError(f"the fallback chain has no {step} step now")

    def model_info(self) -> ModelInfo:
        """The versions served, each step's breaker and counts, the shadow statistics."""
        serving = self._serving
        answered = {position: tally.value for position, tally in self._answered.items()}
        with self._count_lock:
            failures = dict(self._failures)
        steps = [
            StepInfo.of(e.position, e.version, e.step, answered[e.position], failures, e.limit)
            for e in serving.steps
        ]
        return describe(
            serving.current,
            serving.previous,
            steps,
            default_answers=answered.get("default", 0),
            has_default=self._default is not None,
            challenger=self._challenger,
        )
