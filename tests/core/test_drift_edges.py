"""Bin edges of the drift reference: frequent values apart, the rest in quantile bins."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.drift import (
    FREQUENT_WIDTH,
    MAX_BINS,
    QUANTILE_BINS,
    Histogram,
    count_into,
    reference_edges,
)


def bin_of(edges: list[float], value: float) -> int:
    return int(np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(edges) - 2))


def mostly_zero_grey_levels(rng: np.random.Generator) -> np.ndarray:
    """Integers 0-16, 0 in 70% of the samples, as digits' pixel columns are."""
    return np.where(rng.random(2000) < 0.7, 0, rng.integers(1, 17, 2000)).astype(np.float64)


def test_each_frequent_integer_gets_a_bin_of_its_own() -> None:
    values = mostly_zero_grey_levels(np.random.default_rng(0))
    edges = reference_edges(values)
    histogram = count_into(values, edges)
    zero = bin_of(edges, 0.0)
    assert histogram.counts[zero] == np.count_nonzero(values == 0)  # nothing but the zeros
    # A shift by a fraction of a grey level already leaves the zeros' bin.
    assert bin_of(edges, FREQUENT_WIDTH * 1.5) != zero
    # The other values still share quantile bins, with edges between grey levels.
    inner = [edge for edge in edges[1:-1] if edge > FREQUENT_WIDTH]
    assert inner and all(edge % 1 == 0.5 for edge in inner[:-1])


def test_few_values_of_equal_weight_each_get_a_bin() -> None:
    values = np.random.default_rng(1).integers(0, 4, 500).astype(np.float64)
    edges = reference_edges(values)
    counts = count_into(values, edges).counts
    for level in range(4):
        assert counts[bin_of(edges, level)] == np.count_nonzero(values == level)


def test_a_continuous_feature_keeps_quantile_bins() -> None:
    values = np.random.default_rng(2).normal(size=5000)
    edges = reference_edges(values)
    assert len(edges) == QUANTILE_BINS + 1
    ordered = np.sort(values)
    # the range reaches a tenth of a step beyond the extreme values
    assert edges[0] == pytest.approx(ordered[0] - FREQUENT_WIDTH * (ordered[1] - ordered[0]))
    assert edges[-1] == pytest.approx(ordered[-1] + FREQUENT_WIDTH * (ordered[-1] - ordered[-2]))
    shares = np.asarray(count_into(values, edges).counts) / values.size
    assert np.allclose(shares, 1 / QUANTILE_BINS, atol=0.002)


def test_a_continuous_feature_with_a_resting_value_keeps_that_value_apart() -> None:
    rng = np.random.default_rng(3)
    values = np.where(rng.random(3000) < 0.3, 0.0, rng.normal(size=3000))
    edges = reference_edges(values)
    counts = count_into(values, edges).counts
    assert counts[bin_of(edges, 0.0)] == np.count_nonzero(values == 0)
    assert len(edges) - 1 > QUANTILE_BINS // 2  # the rest still in several quantile bins


@pytest.mark.parametrize("seed", range(5))
def test_the_number_of_bins_is_bounded(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        size = int(rng.integers(2, 500))
        levels = rng.integers(0, rng.integers(1, 40), size)
        values = np.where(rng.random(size) < rng.random(), levels, 30 * rng.normal(size=size))
        values[rng.random(size) < 0.05] = np.nan
        edges = reference_edges(values)
        histogram = Histogram(edges=edges, counts=[0] * (len(edges) - 1))  # edges never decrease
        assert 1 <= len(histogram.counts) <= MAX_BINS
        assert sum(count_into(values, edges).counts) == np.count_nonzero(np.isfinite(values))


def test_a_single_value_and_no_value() -> None:
    assert reference_edges(np.full(10, 3.0)) == [3.0, 3.0]
    assert reference_edges(np.array([np.nan, np.inf])) == [0.0, 0.0]
