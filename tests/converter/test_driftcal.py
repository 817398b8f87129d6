"""Drift thresholds calibrated by resampling whole reference samples."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import binomtest

from edgefleet.converter.driftcal import calibrate, outside_draws, sample_cells, statistics
from edgefleet.drift import count_into, quantile_edges
from edgefleet.driftstats import FeatureThresholds, statistic, threshold_at

WINDOWS = [50, 200, 500]
WINDOW = 200
REFERENCE_SAMPLES = 1000
Samples = Callable[[np.random.Generator, int], np.ndarray]


def per_sample(values: np.ndarray) -> list[np.ndarray]:
    """One entry per sample (row): the values it adds to the counts."""
    return [np.atleast_1d(row) for row in values]


def each_value_a_sample(values: np.ndarray) -> list[np.ndarray]:
    """What a calibration that took pooled values for independent samples would see."""
    return per_sample(values.reshape(-1))


def normal(rng: np.random.Generator, samples: int) -> np.ndarray:
    return rng.normal(size=samples)


def images(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Samples of 32 pixels that share a brightness: pooled, the values are far from independent."""
    brightness = rng.normal(size=(samples, 1))
    return brightness + 0.3 * rng.normal(size=(samples, 32))


def alarms(
    make: Samples,
    rng: np.random.Generator,
    rates: list[float],
    references: int = 4,
    windows: int = 500,
) -> list[int]:
    """Alarms per rate in fresh windows, each against a fresh reference calibrated anew."""
    found = [0] * len(rates)
    for _ in range(references):
        reference = make(rng, REFERENCE_SAMPLES)
        edges = quantile_edges(reference)
        thresholds = calibrate(per_sample(reference), edges, WINDOWS, [max(rates)], rng)
        reference_counts = count_into(reference, edges)
        cuts = [threshold_at(thresholds, WINDOW, rate) for rate in rates]
        for _ in range(windows):
            value = statistic(reference_counts, count_into(make(rng, WINDOW), edges), thresholds)
            for index, cut in enumerate(cuts):
                assert cut is not None
                found[index] += value > cut
    return found


def consistent(found: int, windows: int, rate: float) -> bool:
    """Whether `found` alarms in `windows` fit `rate` (two-sided binomial test at 0.1%)."""
    return bool(binomtest(found, windows, rate).pvalue > 0.001)


def test_the_vectorised_statistic_is_the_core_statistic() -> None:
    rng = np.random.default_rng(1)
    reference = np.concatenate([rng.normal(size=300), [np.nan] * 4])
    edges = quantile_edges(reference)
    window = np.concatenate([rng.normal(0.4, 1.5, size=120), [np.nan, -9.0, 9.0]])
    cells = [sample_cells(per_sample(values), edges).sum(axis=0) for values in (reference, window)]
    expected = statistic(count_into(reference, edges), count_into(window, edges))
    assert statistics(cells[0][None], cells[1][None])[0] == pytest.approx(expected)
    scaled = FeatureThresholds(
        false_alarm=0.01, by_window={100: 1.0}, statistic="scaled-sum", part_scales=(30.0, 12.0)
    )
    tail_max = FeatureThresholds(
        false_alarm=0.01,
        by_window={100: 1.0},
        tail={100: 1.0},
        statistic="tail-max",
        part_scales=(3.0, 2.0),
        part_levels=(30.0, 12.0),
    )
    tail_max_psi = FeatureThresholds(
        false_alarm=0.01,
        by_window={100: 1.0},
        tail={100: 1.0},
        statistic="tail-max-psi",
        part_scales=(3.0, 2.0, 2.5),
        part_levels=(30.0, 12.0, 13.0),
    )
    outside = np.array([[1, 1]])  # -9.0 below the range, 9.0 above it
    for thresholds in (scaled, tail_max, tail_max_psi):
        expected = statistic(count_into(reference, edges), count_into(window, edges), thresholds)
        found = statistics(cells[0][None], cells[1][None], thresholds, outside)[0]
        assert found == pytest.approx(expected)
    folded = count_into(window, edges)
    assert cells[1].tolist() == [
        folded.counts[0] + folded.below,
        *folded.counts[1:-1],
        folded.counts[-1] + folded.above,
        folded.nan,
    ]


def test_calibrated_thresholds_hold_their_false_alarm_rate_on_fresh_windows() -> None:
    found = alarms(normal, np.random.default_rng(2), [0.05, 0.005])
    assert consistent(found[0], 2000, 0.05), found
    assert consistent(found[1], 2000, 0.005), found  # through the fitted tail


def test_pooled_correlated_values_get_higher_thresholds_that_hold() -> None:
    rng = np.random.default_rng(3)
    reference = images(rng, REFERENCE_SAMPLES)
    edges = quantile_edges(reference)
    pooled = calibrate(per_sample(reference), edges, [WINDOW], [0.05], rng)
    independent = calibrate(each_value_a_sample(reference), edges, [WINDOW * 32], [0.05], rng)
    assert pooled.values_per_sample == 32 and independent.values_per_sample == 1
    pooled_cut = threshold_at(pooled, WINDOW)
    independent_cut = threshold_at(independent, WINDOW * 32)
    assert pooled_cut is not None and independent_cut is not None
    assert pooled.part_levels is not None and independent.part_levels is not None
    # the correlated values' parts reach far more without drift: each part's level says so
    assert pooled.statistic == "tail-max" and independent.statistic == "tail-max-psi"
    folded_parts = independent.part_levels[:2]  # the PSI part is one value per sample's only
    assert all(p > 5 * i for p, i in zip(pooled.part_levels, folded_parts, strict=True))

    reference_counts = count_into(reference, edges)
    calm = [count_into(images(rng, WINDOW), edges) for _ in range(1000)]
    pooled_alarms = sum(statistic(reference_counts, w, pooled) > pooled_cut for w in calm)
    assert consistent(pooled_alarms, 1000, 0.05)
    independent_alarms = sum(
        statistic(reference_counts, w, independent) > independent_cut for w in calm
    )
    assert independent_alarms > 500  # most calm windows would alarm


def test_a_feature_of_one_bin_is_calibrated_with_values_outside_its_range() -> None:
    rng = np.random.default_rng(8)
    constant = np.full(300, 3.0)
    edges = quantile_edges(constant)
    thresholds = calibrate(per_sample(constant), edges, [50, 200], [0.01], rng)
    assert thresholds.statistic == "tail-max-psi" and thresholds.part_levels is not None
    values = [*thresholds.by_window.values(), *thresholds.tail.values(), *thresholds.part_levels]
    assert all(np.isfinite(values))
    moved = count_into(np.full(50, 3.5), edges)  # every value above the range
    cut = threshold_at(thresholds, 50)
    assert cut is not None and statistic(count_into(constant, edges), moved, thresholds) > cut


def test_calibration_refuses_what_it_cannot_use() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="sample"):
        calibrate([], [0.0, 1.0], WINDOWS, [0.01], rng)
    with pytest.raises(ValueError, match="false-alarm"):
        calibrate([np.zeros(1)], [0.0, 1.0], WINDOWS, [1.5], rng)


def test_thresholds_are_a_valid_reference_field() -> None:
    rng = np.random.default_rng(5)
    reference = normal(rng, 300)
    thresholds = calibrate(per_sample(reference), quantile_edges(reference), WINDOWS, [0.01], rng)
    assert FeatureThresholds.model_validate_json(thresholds.model_dump_json()) == thresholds
    assert sorted(thresholds.by_window) == WINDOWS and sorted(thresholds.tail) == WINDOWS
    assert thresholds.statistic == "tail-max-psi"
    assert thresholds.part_scales is not None and thresholds.part_levels is not None
    assert len(thresholds.part_scales) == len(thresholds.part_levels) == 3


def test_values_outside_the_range_are_drawn_as_a_window_of_the_same_population_holds_them() -> None:
    rng = np.random.default_rng(7)
    reference_samples, window_samples, trials = 200, 100, 4000
    found = np.zeros((trials, 2), dtype=np.int64)
    for trial in range(trials):
        reference, window = rng.normal(size=reference_samples), rng.normal(size=window_samples)
        found[trial] = (window < reference.min()).sum(), (window > reference.max()).sum()
    drawn = outside_draws(reference_samples, window_samples, trials, rng)
    assert drawn.shape == (trials, 2) and drawn.min() >= 0
    # exchangeable samples: n / (N + 1) on average, at least 2 with chance C(n, 2) / C(N + n, 2)
    at_least_two = math.comb(window_samples, 2) / math.comb(reference_samples + window_samples, 2)
    for side in (0, 1):
        for counts in (found[:, side], drawn[:, side]):
            assert counts.mean() == pytest.approx(window_samples / (reference_samples + 1), rel=0.1)
            assert consistent(int((counts >= 2).sum()), trials, at_least_two)


def test_a_few_percent_of_missing_values_is_found_even_among_many_features() -> None:
    rng = np.random.default_rng(6)
    reference = normal(rng, REFERENCE_SAMPLES)
    edges = quantile_edges(reference)
    thresholds = calibrate(per_sample(reference), edges, [500], [0.01], rng)
    cut = threshold_at(thresholds, 500, 0.01 / 50)  # the strictest share among 50 features
    assert cut is not None
    reference_counts = count_into(reference, edges)
    windows = [normal(rng, 500) for _ in range(100)]
    for window in windows:
        window[rng.random(500) < 0.05] = np.nan
    found = [
        statistic(reference_counts, count_into(window, edges), thresholds) > cut
        for window in windows
    ]
    assert sum(found) >= 60  # NaN, the last cell, moves every cumulative share
