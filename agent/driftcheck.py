"""The device's own drift check: its telemetry windows judged with the bundle's thresholds.

Once per telemetry window (never per request), `DeviceDriftCheck.observe`
takes the window's input counts. Windows are summed, oldest first, until every
input feature with thresholds has as many samples as its smallest calibrated
window, or MAX_WINDOWS windows were summed; the sum is judged with
`edgefleet.driftstats.judge_window` (the features share the false-alarm rate)
and the next sum starts empty, so no window is judged twice. `Persistence`
turns the verdicts into a state: drift after PERSISTENCE_WINDOWS drifted sums
in a row, calm again after as many calm ones. A sum in which no feature had
enough samples changes nothing (no evidence either way).

The state (`DriftStatus`): `ok`, `drift` (which features, since when) or
`insufficient` (no verdict yet for this model: too few samples, or a bundle
without calibrated thresholds, which only drift-features.json carries).
A new model starts over. Inputs only: the outputs are judged on the server.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from edgefleet.drift import Histogram
from edgefleet.driftfeatures import AnyReference, DriftFeatures
from edgefleet.driftstats import (
    PERSISTENCE_WINDOWS,
    FeatureThresholds,
    Persistence,
    judge_window,
    window_samples,
)
from edgefleet.timefmt import format_time, parse_time

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edgefleet.mqtt.messages import BinCounts, TelemetryWindow

MAX_WINDOWS = 16  # at most this many telemetry windows summed into one judged window

DriftState = Literal["ok", "drift", "insufficient"]


@dataclass(frozen=True)
class DriftStatus:
    """What the device's own check says of its inputs."""

    state: DriftState = "insufficient"
    features: tuple[str, ...] = ()  # the drifted features, while `state` is drift
    since: dt.datetime | None = None  # when the drift was flagged

    def describe(self) -> str:
        """ "ok", "drift on a, b since 2026-03-01T12:00:00Z" or "insufficient"."""
        if self.state != "drift":
            return self.state
        since = f" since {format_time(self.since)}" if self.since is not None else ""
        return f"drift on {', '.join(self.features)}{since}"


References = dict[str, tuple[Histogram, FeatureThresholds | None]]


@dataclass
class _Sum:
    windows: int = 0
    counts: dict[str, Histogram] = field(default_factory=dict)


class DeviceDriftCheck:
    """Judges the input counts of successive telemetry windows; see the module docstring."""

    def __init__(
        self, persistence_windows: int = PERSISTENCE_WINDOWS, max_windows: int = MAX_WINDOWS
    ) -> None:
        self.persistence_windows = persistence_windows
        self.max_windows = max_windows
        self.status = DriftStatus()
        self._model: tuple[str, str] | None = None
        self._persistence = Persistence(persistence_windows)
        self._sum = _Sum()

    def observe(self, window: TelemetryWindow, reference: AnyReference | None) -> DriftStatus:
        """Add one window (of the model `reference` belongs to); returns the state after it."""
        model = (window.bundle_name, window.bundle_version)
        if model != self._model:
            self._model = model
            self._persistence = Persistence(self.persistence_windows)
            self._sum = _Sum()
            self.status = DriftStatus()
        references = _calibrated(reference)
        if not references:
            return self.status
        self._add(window.inputs, references)
        if not self._enough(references) and self._sum.windows < self.max_windows:
            return self.status
        verdict = judge_window(references, self._sum.counts)
        self._sum = _Sum()
        if all(feature.status == "insufficient" for feature in verdict.features):
            return self.status
        self._persistence.update(bool(verdict.drifted))
        if not self._persistence.is_open:
            self.status = DriftStatus("ok")
        elif self.status.state != "drift":
            self.status = DriftStatus(
                "drift", tuple(verdict.drifted), parse_time(window.window_end)
            )
        elif verdict.drifted:
            self.status = DriftStatus("drift", tuple(verdict.drifted), self.status.since)
        return self.status

    def _add(self, inputs: Mapping[str, BinCounts], references: References) -> None:
        self._sum.windows += 1
        for name, counts in inputs.items():
            if name not in references:
                continue
            edges = references[name][0].edges
            if len(counts.counts) != len(edges) - 1:
                continue  # counted for other bins: not comparable
            before = self._sum.counts.get(name) or Histogram(
                edges=edges, counts=[0] * (len(edges) - 1)
            )
            self._sum.counts[name] = Histogram(
                edges=edges,
                counts=[a + b for a, b in zip(before.counts, counts.counts, strict=True)],
                below=before.below + counts.below,
                above=before.above + counts.above,
                nan=before.nan + counts.nan,
            )

    def _enough(self, references: References) -> bool:
        for name, (_, thresholds) in references.items():
            if thresholds is None:
                continue
            live = self._sum.counts.get(name)
            if live is None or window_samples(thresholds, live) < min(thresholds.by_window):
                return False
        return True


def _calibrated(reference: AnyReference | None) -> References:
    """The input features of `reference` by name, when any of them has thresholds."""
    if not isinstance(reference, DriftFeatures):
        return {}
    if all(feature.thresholds is None for feature in reference.inputs):
        return {}
    return {feature.name: (feature.histogram, feature.thresholds) for feature in reference.inputs}
