"""The agent counts into a reference whose frequent values have bins of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.agent.inference.bins import tensor_bins
from edgefleet.drift import DriftReference, FeatureReference, count_into, reference_edges
from edgefleet.driftfeatures import (
    FEATURES_FILE,
    DriftFeature,
    DriftFeatures,
    TensorLayout,
    load_reference,
)


def grey_levels(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Two columns of integers 0-16, mostly 0, as float32 inputs."""
    values = np.where(rng.random((rows, 2)) < 0.7, 0, rng.integers(1, 17, (rows, 2)))
    return values.astype(np.float32)


def test_live_counts_land_in_the_frequent_values_bins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = grey_levels(rng, 1000)
    features = []
    for column in range(2):
        values = reference[:, column].astype(np.float64)
        edges = reference_edges(values)
        features.append(
            DriftFeature(
                name=f"pixels[{column}]",
                tensor="pixels",
                index=column,
                histogram=count_into(values, edges),
                summary="value",
            )
        )
    layout = TensorLayout(tensor="pixels", batched=True, rank=1, axis=0, width=2)
    written = DriftFeatures(samples=1000, tensors=[layout], inputs=features, outputs=[])
    (tmp_path / FEATURES_FILE).write_text(written.model_dump_json())
    loaded, notes = load_reference(tmp_path)
    assert notes == [] and loaded is not None

    [counter] = tensor_bins(loaded, outputs=False)
    live = grey_levels(rng, 300)
    live[:10] = 0.3  # a third of a grey level off: out of the zeros' bin
    for batch in np.split(live, 3):
        counter.take(batch)
    counter.flush()
    counted = counter.bin_counts()

    for column, feature in enumerate(features):
        edges = feature.histogram.edges
        got = counted[feature.name]
        expected = count_into(live[:, column].astype(np.float64), edges)
        assert got.counts == expected.counts and got.below == got.above == got.nan == 0
        zero = int(np.searchsorted(edges, 0.0, side="right")) - 1
        assert got.counts[zero] == np.count_nonzero(live[:, column] == 0)


def test_the_first_format_is_counted_into_the_same_bins() -> None:
    """drift-reference.json carries the same edges: agents that read only it count them too."""
    rng = np.random.default_rng(1)
    reference = grey_levels(rng, 500)
    features = []
    for column in range(2):
        values = reference[:, column].astype(np.float64)
        histogram = count_into(values, reference_edges(values))
        features.append(
            FeatureReference(
                name=f"pixels[{column}]", tensor="pixels", index=column, histogram=histogram
            )
        )
    written = DriftReference(samples=500, feature_axes={"pixels": 0}, inputs=features, outputs=[])
    [counter] = tensor_bins(DriftReference.model_validate_json(written.model_dump_json()), False)
    live = grey_levels(rng, 200)
    counter.take(live)
    counter.flush()
    counted = counter.bin_counts()
    for column, feature in enumerate(features):
        expected = count_into(live[:, column].astype(np.float64), feature.histogram.edges)
        assert counted[feature.name].counts == expected.counts
