"""Telemetry of the predictor: count windows for the server, live counters for the installer.

Per window (`close_window`, a `TelemetryWindow` of edgefleet.mqtt.messages):
- `requests` counts every call; `errors` (every step of the chain failed) and
  `schema_violations` (refused inputs) are the calls among them that got no
  answer; `fallbacks` the answered calls that a step other than the primary
  model answered. The latency histogram holds the answered calls.
- per input feature and per output feature (as the bundle's drift reference
  defines them: drift-features.json's per-sample features, edgefleet.driftfeatures,
  or for bundles without it drift-reference.json's pooled values,
  edgefleet.drift), the values counted into exactly the reference's bins, plus
  NaN, below-range and above-range counts, under the reference's feature names
  ("image[0].mean", "logits.top1", "features[3]"). Outputs of the configured
  default answer are not counted: they say nothing of the model.
- shadow agreement and labelled feedback, when there were any: labelled
  answers, the class labels among them that were right, and for regression
  feedback the sums of |error| and error squared.
Input values outside the reference range by more than the schema margin
(schema.py `allowed_range`: a warning, not an error) are counted as they are
binned, into `counters()["out_of_range"]` for the local API; on the wire they
show in the below/above counts.

Cost (goal: at most 3% of the inference time of the CNN fixture): a request
hands one copy per tensor to the binning (edgefleet.agent.inference.bins,
which also documents how large tensors are subsampled) and puts its latency in
the ring of the live counters; every FLUSH_REQUESTS requests, and when a window
closes, the values and the latencies are binned in bulk.
With a `drift` (edgefleet.agent.reservoir.DeviceDrift), each closed window is
judged on the device, and each request's inputs are offered to its reservoir
(which keeps nothing unless capture is on and drift is flagged).

Live counters (`mark` / `snapshot_since`, the installer's HealthProbe) run over
the recorder's whole life, across windows and model switches; latency p95 uses
the last LATENCY_RING answered calls, and so does the median latency per sample
(a call's latency over its samples), which the health check records as this
device's measurement of the model (edgefleet.agent.inference.timing).
Thread-safe: one lock, held briefly.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.agent.inference.bins import tensor_bins
from edgefleet.agent.inference.timing import sample_count
from edgefleet.agent.install.interfaces import HealthSnapshot
from edgefleet.driftfeatures import AnyReference
from edgefleet.mqtt.messages import (
    BinCounts,
    LabelledCounts,
    LatencyHistogram,
    ShadowCounts,
    TelemetryWindow,
)
from edgefleet.timefmt import format_time, utcnow

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from edgefleet.agent.inference.chain import Prediction
    from edgefleet.agent.reservoir import DeviceDrift

DEFAULT_LATENCY_BOUNDS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
FLUSH_REQUESTS = 256
LATENCY_RING = 4096
MAX_EARLY_WINDOWS = 8  # windows ended by model switches and not yet taken (oldest dropped)


class _Window:
    def __init__(
        self,
        start: dt.datetime,
        name: str | None,
        version: str | None,
        reference: AnyReference | None,
        slots: int,
    ) -> None:
        self.start = start
        self.name = name
        self.version = version
        self.reference = reference
        self.requests = self.errors = self.fallbacks = self.schema_violations = 0
        self.pending = 0  # requests whose values wait to be binned
        self.latency = [0] * slots
        self.shadow_requests = self.shadow_agreements = 0
        self.labelled = self.correct = 0
        self.regression_labels = 0  # labelled answers that were numbers, not classes
        self.abs_error = self.squared_error = 0.0
        self.inputs = tensor_bins(reference, outputs=False)
        self.outputs = tensor_bins(reference, outputs=True)

    def flush(self, bounds: np.ndarray, latencies: list[float]) -> int:
        """Bin what is pending (`latencies`: the pending calls' latencies, the oldest first);
        returns the input values outside the allowed range."""
        slots = np.searchsorted(bounds, latencies, side="left")  # as bisect_left
        for slot, count in enumerate(np.bincount(slots, minlength=len(self.latency)).tolist()):
            self.latency[slot] += count
        self.pending = 0
        outside = sum(bins.flush() for bins in self.inputs)
        for bins in self.outputs:
            bins.flush()
        return outside


@dataclass(frozen=True)
class TelemetryMark:
    """Where the live counters stood; pass it to `snapshot_since`."""

    requests: int
    errors: int
    fallbacks: int
    answered: int


class TelemetryRecorder:
    """Counts what the predictor serves; see the module docstring."""

    def __init__(
        self,
        device_id: str,
        drift_reference: AnyReference | None,
        window_seconds: float,
        latency_bounds_ms: Sequence[float] = DEFAULT_LATENCY_BOUNDS_MS,
        *,
        bundle_name: str | None = None,
        bundle_version: str | None = None,
        now: dt.datetime | None = None,
        drift: DeviceDrift | None = None,
    ) -> None:
        self.device_id = device_id
        self.drift = drift  # the device's own drift check (and reservoir), fed here
        self.window_seconds = window_seconds  # the period of the caller's `close_window` calls
        self.latency_bounds_ms = tuple(float(b) for b in latency_bounds_ms)
        self._bounds = np.asarray(self.latency_bounds_ms, dtype=np.float64)
        self._lock = threading.Lock()
        self._window = _Window(
            now or utcnow(),
            bundle_name,
            bundle_version,
            drift_reference,
            len(self.latency_bounds_ms) + 1,
        )
        self._reference = drift_reference
        self._early: deque[tuple[TelemetryWindow, AnyReference | None]] = deque(
            maxlen=MAX_EARLY_WINDOWS
        )
        # Live counters, over the recorder's life.
        self._requests = self._errors = self._fallbacks = self._answered = 0
        self._out_of_range = self._label_errors = 0
        self._abs_error = 0.0
        self._latencies = [0.0] * LATENCY_RING
        self._sample_latencies = [0.0] * LATENCY_RING  # each call's latency over its samples

    # --- the model whose traffic is counted -----------------------------------------------

    def set_model(
        self,
        bundle_name: str | None,
        bundle_version: str | None,
        drift_reference: AnyReference | None,
        now: dt.datetime | None = None,
    ) -> None:
        """Count from now on for this model; a window with traffic of another model ends here."""
        with self._lock:
            window = self._window
            if (window.name, window.version) == (bundle_name, bundle_version):
                return
            moment = now or utcnow()
            if window.name is not None and window.requests:
                closed, moment = self._finish(window, moment)
                self._early.append((closed, window.reference))
            self._reference = drift_reference
            self._window = self._new_window(moment, bundle_name, bundle_version)

    def _new_window(self, start: dt.datetime, name: str | None, version: str | None) -> _Window:
        return _Window(start, name, version, self._reference, len(self.latency_bounds_ms) + 1)

    # --- per request -------------------------------------------------------------------------

    def record(
        self,
        prediction: Prediction,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """One answered call: its latency, chain step, and values."""
        latency = prediction.latency_ms
        fallback = prediction.step != "primary"
        per_sample = latency / sample_count(inputs)
        with self._lock:
            window = self._window
            window.requests += 1
            ring = self._answered % LATENCY_RING
            self._latencies[ring] = latency
            self._sample_latencies[ring] = per_sample
            self._answered += 1
            self._requests += 1
            if fallback:
                window.fallbacks += 1
                self._fallbacks += 1
            for bins in window.inputs:
                bins.take(inputs.get(bins.tensor))
            if prediction.step != "default":
                for bins in window.outputs:
                    bins.take(outputs.get(bins.tensor))
            window.pending += 1
            if window.pending >= FLUSH_REQUESTS:
                self._flush(window)
        if self.drift is not None:
            self.drift.offer(inputs, (window.name, window.version))

    def record_error(self) -> None:
        """A call that every step of the chain failed."""
        with self._lock:
            self._window.requests += 1
            self._window.errors += 1
            self._requests += 1
            self._errors += 1

    def record_schema_violation(self) -> None:
        """A call refused for its inputs."""
        with self._lock:
            self._window.requests += 1
            self._window.schema_violations += 1
            self._requests += 1
            self._errors += 1  # no answer: an error for the health check

    def record_shadow(self, agreed: bool) -> None:
        with self._lock:
            self._window.shadow_requests += 1
            self._window.shadow_agreements += int(agreed)

    def record_label(self, correct: bool | None = None, error: float | None = None) -> None:
        """Feedback for an earlier answer: right or wrong (classes), or its error (regression)."""
        with self._lock:
            if correct is not None:
                self._window.labelled += 1
                self._window.correct += int(correct)
            if error is not None and math.isfinite(error):
                window = self._window
                window.labelled += 1
                window.regression_labels += 1
                window.abs_error += abs(error)
                window.squared_error += error * error
                self._label_errors += 1
                self._abs_error += abs(error)

    # --- windows -------------------------------------------------------------------------------

    def is_due(self, now: dt.datetime | None = None) -> bool:
        """True when the running window is `window_seconds` old, or a model switch ended one."""
        with self._lock:
            age = ((now or utcnow()) - self._window.start).total_seconds()
            return bool(self._early) or age >= self.window_seconds

    def close_window(self, now: dt.datetime | None = None) -> TelemetryWindow | None:
        """The oldest window not yet taken.

        That is a window ended early by a model switch when there is one (the
        running window then keeps running), else the running window, ended at
        `now` (a new one starts there). None while no model is set. Times are
        whole seconds; a window lasts at least one. The device's own drift
        check, when there is one, judges the window here.
        """
        with self._lock:
            if self._early:
                closed, reference = self._early.popleft()
            else:
                window = self._window
                if window.name is None or window.version is None:
                    return None
                closed, end = self._finish(window, now or utcnow())
                reference = window.reference
                self._window = self._new_window(end, window.name, window.version)
        if self.drift is not None:
            self.drift.observe(closed, reference)
        return closed

    def _flush(self, window: _Window) -> None:
        """Bin the running window's pending calls: their values and, from the latency ring
        (which holds them: FLUSH_REQUESTS <= LATENCY_RING), their latencies."""
        end = self._answered
        latencies = [self._latencies[i % LATENCY_RING] for i in range(end - window.pending, end)]
        self._out_of_range += window.flush(self._bounds, latencies)

    def _finish(self, window: _Window, now: dt.datetime) -> tuple[TelemetryWindow, dt.datetime]:
        assert window.name is not None and window.version is not None
        self._flush(window)
        end = max(
            now.replace(microsecond=0),
            window.start.replace(microsecond=0) + dt.timedelta(seconds=1),
        )
        shadow = (
            ShadowCounts(requests=window.shadow_requests, agreements=window.shadow_agreements)
            if window.shadow_requests
            else None
        )
        labelled = None
        if window.regression_labels:
            labelled = LabelledCounts(
                count=window.labelled,
                correct=window.correct,
                abs_error=window.abs_error,
                squared_error=window.squared_error,
            )
        elif window.labelled:
            labelled = LabelledCounts(count=window.labelled, correct=window.correct)
        inputs: dict[str, BinCounts] = {}
        outputs: dict[str, BinCounts] = {}
        for bins in window.inputs:
            inputs.update(bins.bin_counts())
        for bins in window.outputs:
            outputs.update(bins.bin_counts())
        message = TelemetryWindow(
            device_id=self.device_id,
            window_start=format_time(window.start),
            window_end=format_time(end),
            bundle_name=window.name,
            bundle_version=window.version,
            requests=window.requests,
            errors=window.errors,
            fallbacks=window.fallbacks,
            schema_violations=window.schema_violations,
            latency=LatencyHistogram(bounds_ms=list(self.latency_bounds_ms), counts=window.latency),
            inputs=inputs,
            outputs=outputs,
            shadow=shadow,
            labelled=labelled,
        )
        return message, end

    # --- live counters (the installer's health check) ------------------------------------------

    def mark(self) -> TelemetryMark:
        with self._lock:
            return TelemetryMark(self._requests, self._errors, self._fallbacks, self._answered)

    def snapshot_since(self, mark: object) -> HealthSnapshot:
        """Requests, errors (calls without an answer), fallbacks, p95 latency and the median
        latency per sample since `mark`."""
        if not isinstance(mark, TelemetryMark):
            raise TypeError("pass a mark from this recorder's mark()")
        with self._lock:
            answered = self._answered - mark.answered
            start = self._answered - min(answered, LATENCY_RING)
            slots = [i % LATENCY_RING for i in range(start, self._answered)]
            recent = [self._latencies[i] for i in slots]
            per_sample = [self._sample_latencies[i] for i in slots]
            requests = self._requests - mark.requests
            errors = self._errors - mark.errors
            fallbacks = self._fallbacks - mark.fallbacks
        p95 = float(np.percentile(recent, 95)) if recent else None
        return HealthSnapshot(
            requests=requests,
            errors=errors,
            fallbacks=fallbacks,
            latency_p95_ms=p95,
            sample_ms=float(np.median(per_sample)) if per_sample else None,
        )

    since = snapshot_since  # the installer's HealthProbe protocol

    def counters(self) -> dict[str, float]:
        """Live totals for the local API's health view."""
        with self._lock:
            return {
                "requests": self._requests,
                "errors": self._errors,
                "fallbacks": self._fallbacks,
                "out_of_range": self._out_of_range,
                "label_errors": self._label_errors,
                "mean_abs_error": self._abs_error / self._label_errors
                if self._label_errors
                else 0.0,
            }
