"""The drift reference: the contract between the converter, the agent and the server.

The converter runs the shipped model on reference data and records, per input
feature and per output feature, bin edges at reference quantiles and the
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
