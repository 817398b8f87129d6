"""The drift reference: the contract between the converter, the agent and the server.

The converter runs the shipped model on reference data and records, per input
feature and per output feature, bin edges (`reference_edges`) and the
reference counts. The agent counts live values into exactly those bins (plus
NaN, below-range and above-range counters) and the server compares windows of
counts with the reference.

Which values form a feature: for each tensor, the per-sample shape (without
the batch axis) has a feature axis, the last axis, except for ONNX image
tensors (per-sample rank 3, CHW), whose channel axis comes first. Each index
along that axis is one feature; values along the other axes (pixels, time
steps) are pooled into it. A tensor with more than MAX_FEATURES features along
that axis, or none (a scalar per sample), is one feature as a whole.

The binning functions need numpy, which the converter and the agent have; the
rest of the core does not import them.

This file is drift-reference.json, whose format is frozen; the per-sample
features with calibrated thresholds are in drift-features.json
(edgefleet.driftfeatures), which agents that know it read in preference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np

MAX_FEATURES = 64
QUANTILE_BINS = 10
MAX_BINS = 2 * QUANTILE_BINS  # what reference_edges gives at most (see there)
FREQUENT_WIDTH = 0.1  # a frequent value's bin reaches this share of the way to its neighbours
REFERENCE_FILE = "drift-reference.json"


class Histogram(BaseModel):
    """Counts of values in bins [e0, e1), [e1, e2), ..., [e(k-1), ek], and outside them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    edges: list[float] = Field(min_length=2)
    counts: list[int]
    below: int = Field(default=0, ge=0)
    above: int = Field(default=0, ge=0)
    nan: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError("counts must have one entry per bin (len(edges) - 1)")
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must not decrease")
        return self


class FeatureReference(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str  # "features[3]", "image[c0]", "logits[7]", or the tensor name when whole
    tensor: str
    index: int | None  # along the tensor's feature axis; None: the whole tensor
    histogram: Histogram


class DriftReference(BaseModel):
    """drift-reference.json: the frozen first format (read leniently, written unchanged)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1
    samples: int = Field(ge=1)
    bins: int = QUANTILE_BINS
    feature_axes: dict[str, int | None]  # per tensor, axis of the per-sample shape
    inputs: list[FeatureReference]
    outputs: list[FeatureReference]


def feature_axis(per_sample_shape: tuple[int, ...], channels_first: bool) -> int | None:
    """The axis of the per-sample shape whose indices are features, or None for the whole tensor."""
    rank = len(per_sample_shape)
    if rank == 0:
        return None
    axis = 0 if channels_first and rank == 3 else rank - 1
    return axis if per_sample_shape[axis] <= MAX_FEATURES else None


def quantile_edges(values: np.ndarray, bins: int = QUANTILE_BINS) -> list[float]:
    """Bin edges at the reference quantiles (duplicates merged: discrete data gets fewer bins)."""
    import numpy as np

    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [0.0, 0.0]
    edges = np.unique(np.quantile(finite.astype(np.float64), np.linspace(0, 1, bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    return [float(edge) for edge in edges]


def _between(distinct: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each edge moved half-way between the reference values on either side of it."""
    import numpy as np

    above = np.clip(np.searchsorted(distinct, edges, side="left"), 1, distinct.size - 1)
    return np.asarray((distinct[above - 1] + distinct[above]) / 2)


def reference_edges(values: np.ndarray, bins: int = QUANTILE_BINS) -> list[float]:
    """A feature's bin edges: frequent values apart, the other values in quantile bins.

    A value is frequent when it carries at least 1/`bins` of the reference
    (integer pixels that are mostly 0, a sensor's resting value, a clipped
    bound): it gets a bin of its own reaching FREQUENT_WIDTH of the way to the
    neighbouring reference values, so that even a shift of a fraction of a step
    moves it out. The values between frequent values (and beyond the first and
    last) are split into quantile bins, as many as `bins` times their share
    (at least one), with edges half-way between neighbouring reference values.
    Without frequent values these are `quantile_edges`' bins, edges moved so.
    The first and last edges lie FREQUENT_WIDTH of a step (to the neighbouring
    value) beyond the smallest and the largest reference value: what a device
    counts below or above them is outside the reference's range by more than
    rounding, which edgefleet.driftstats judges apart.

    At most MAX_BINS bins: at most `bins` values are frequent, and each stretch
    between or beside them gets one bin plus `bins` times its share (between two
    neighbouring frequent values, an empty bin). The bound keeps what a device
    sends per feature small, and each cell estimable from the reference (every
    cell adds noise to the statistic's cell part).
    """
    import numpy as np

    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return [0.0, 0.0]
    distinct, occurrences = np.unique(finite, return_counts=True)
    if distinct.size == 1:
        return [float(distinct[0])] * 2
    frequent = occurrences * bins >= finite.size
    steps = np.diff(distinct)
    # The range reaches FREQUENT_WIDTH of a step beyond the extreme values, as a
    # frequent value's bin does: a device's rounding of an extreme stays inside.
    edges = [distinct[:1] - FREQUENT_WIDTH * steps[:1], distinct[-1:] + FREQUENT_WIDTH * steps[-1:]]
    for index in np.flatnonzero(frequent):
        if index > 0:
            edges.append(distinct[index : index + 1] - FREQUENT_WIDTH * steps[index - 1])
        if index < distinct.size - 1:
            edges.append(distinct[index : index + 1] + FREQUENT_WIDTH * steps[index])
    # Stretches of values that are not frequent: [start, stop) indices into `distinct`.
    bounds = np.flatnonzero(np.diff(np.concatenate([[1], frequent.astype(np.int8), [1]])))
    for start, stop in zip(bounds[::2], bounds[1::2], strict=True):
        low, high = distinct[start], distinct[stop - 1]
        stretch = finite[(finite >= low) & (finite <= high)]
        stretch_bins = max(1, stretch.size * bins // finite.size)
        inner = np.asarray(quantile_edges(stretch, stretch_bins)[1:-1])
        edges.append(_between(distinct, inner[inner > low]))
    return [float(edge) for edge in np.unique(np.concatenate(edges))]


def count_into(values: np.ndarray, edges: list[float]) -> Histogram:
    """Count `values` into the bins that `edges` define."""
    import numpy as np

    flat = values.reshape(-1).astype(np.float64)
    nan = np.isnan(flat)
    finite = flat[~nan]
    low, high = edges[0], edges[-1]
    below = finite < low
    above = finite > high
    inside = finite[~below & ~above]
    positions = np.searchsorted(np.asarray(edges), inside, side="right") - 1
    positions = np.clip(positions, 0, len(edges) - 2)
    counts = np.bincount(positions, minlength=len(edges) - 1)
    return Histogram(
        edges=edges,
        counts=[int(c) for c in counts],
        below=int(below.sum()),
        above=int(above.sum()),
        nan=int(nan.sum()),
    )


def feature_values(samples: np.ndarray, axis: int | None) -> list[np.ndarray]:
    """Split stacked samples (samples first) into one array of values per feature."""
    import numpy as np

    if axis is None:
        return [samples]
    moved = np.moveaxis(samples, axis + 1, 0)
    return [moved[index] for index in range(moved.shape[0])]
