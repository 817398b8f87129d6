"""The test of values outside the reference's range: exact under exchangeability, judged apart."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import hypergeom

from edgefleet.drift import FREQUENT_WIDTH, Histogram, count_into, reference_edges
from edgefleet.driftstats import (
    OUTSIDE_KINDS,
    FeatureThresholds,
    exchangeable_tail,
    feature_chance,
    judge_feature,
    judge_window,
    outside_chance,
    statistic,
)

EDGES = [0.0, 1.0, 2.0, 3.0, 4.0]
REFERENCE = Histogram(edges=EDGES, counts=[250, 250, 250, 250])
# A statistic threshold no window below reaches: whatever drifts, the outside test found.
THRESHOLDS = FeatureThresholds(
    false_alarm=0.01,
    by_window={100: 1000.0},
    tail={100: 1.0},
    statistic="scaled-sum",
    part_scales=(1.0, 1.0),
    outside_share=0.1,
)


def window(below: int = 0, above: int = 0, nan: int = 0) -> Histogram:
    inside = 400 - below - above - nan  # 400 samples in all
    counts = [inside // 4] * 3 + [inside - 3 * (inside // 4)]
    return Histogram(edges=EDGES, counts=counts, below=below, above=above, nan=nan)


@pytest.mark.parametrize(
    ("reference_hits", "reference_samples", "window_hits", "window_samples"),
    [(0, 2000, 1, 500), (0, 2000, 7, 500), (0, 60, 40, 1000), (12, 719, 30, 500), (3, 200, 9, 100)],
)
def test_the_tail_is_fishers_exact_test(
    reference_hits: int, reference_samples: int, window_hits: int, window_samples: int
) -> None:
    expected = hypergeom.sf(
        window_hits - 1,
        reference_samples + window_samples,
        reference_hits + window_hits,
        window_samples,
    )
    got = exchangeable_tail(reference_hits, reference_samples, window_hits, window_samples)
    assert got == pytest.approx(expected, rel=1e-9)


def test_with_none_in_the_reference_it_is_the_chance_of_lying_beyond_every_reference_sample() -> (
    None
):
    # k window samples below all N reference samples: C(n, k) / C(N + n, k)
    assert exchangeable_tail(0, 2000, 5, 500) == pytest.approx(
        math.comb(500, 5) / math.comb(2500, 5)
    )


def test_a_window_no_more_outside_than_the_reference_has_chance_one() -> None:
    assert exchangeable_tail(10, 1000, 5, 500) == 1.0
    assert exchangeable_tail(0, 1000, 0, 500) == 1.0


def test_the_least_likely_kind_decides_times_the_number_of_kinds() -> None:
    below_only = outside_chance(REFERENCE, window(below=6))
    assert below_only == pytest.approx(OUTSIDE_KINDS * exchangeable_tail(0, 1000, 6, 400))
    assert outside_chance(REFERENCE, window(below=6, above=1, nan=1)) == pytest.approx(below_only)
    assert outside_chance(REFERENCE, window()) == 1.0


def test_pooled_values_count_as_the_fewest_samples_that_could_hold_them() -> None:
    pooled_reference = Histogram(edges=EDGES, counts=[250 * 32] * 4)
    pooled_window = Histogram(edges=EDGES, counts=[100 * 32 - 16] * 4, below=64)
    # 64 values of 32 per sample: at least 2 of the window's 400 samples
    assert outside_chance(pooled_reference, pooled_window, 32.0) == pytest.approx(
        OUTSIDE_KINDS * exchangeable_tail(0, 1000, 2, 400)
    )


def test_values_outside_the_range_drift_where_the_statistic_alone_does_not() -> None:
    outside = window(below=12)
    verdict = judge_feature("x", REFERENCE, THRESHOLDS, outside)
    assert verdict.statistic < (verdict.threshold or 0)
    assert verdict.outside is not None and verdict.outside.below == 12
    assert verdict.outside.cut == pytest.approx(0.01 * 0.1)
    assert verdict.outside.chance < verdict.outside.cut and verdict.status == "drift"
    # a few values outside are what a window of the same population holds
    assert judge_feature("x", REFERENCE, THRESHOLDS, window(below=1, above=1)).status == "ok"


def test_thresholds_without_an_outside_share_judge_the_statistic_alone() -> None:
    written_before = THRESHOLDS.model_copy(update={"outside_share": None})
    verdict = judge_feature("x", REFERENCE, written_before, window(below=200))
    assert verdict.outside is None and verdict.status == "ok"


def test_the_statistic_is_judged_at_the_rate_the_outside_share_leaves() -> None:
    reachable = THRESHOLDS.model_copy(update={"by_window": {100: 20.0}, "tail": {100: 2.0}})
    verdict = judge_feature("x", REFERENCE, reachable, window())
    assert verdict.threshold == pytest.approx(20.0 + 2.0 * math.log(1 / 0.9))


def test_the_window_orders_features_by_the_smaller_of_their_two_chances() -> None:
    outside, calm = window(below=40), window()
    chance = feature_chance(REFERENCE, THRESHOLDS, outside)
    assert chance == pytest.approx(outside_chance(REFERENCE, outside) / 0.1)
    verdict = judge_window(
        {name: (REFERENCE, THRESHOLDS) for name in "ab"}, {"a": calm, "b": outside}
    )
    assert verdict.drifted == ["b"]
    assert verdict.features[1].outside is not None
    assert verdict.features[1].outside.cut == pytest.approx(0.01 * 0.1 / 2)


def test_a_rounded_extreme_stays_inside_and_a_value_beyond_it_does_not() -> None:
    values = np.concatenate([np.zeros(300), np.arange(1.0, 17.0).repeat(20)])
    edges = reference_edges(values)
    assert edges[0] == pytest.approx(-FREQUENT_WIDTH) and edges[-1] == pytest.approx(16.1)
    counted = count_into(np.array([-1e-6, 16.000001, -0.5, 17.0]), edges)
    assert (counted.below, counted.above) == (1, 1)
    assert statistic(count_into(values, edges), count_into(values, edges)) == pytest.approx(0.0)


@pytest.mark.parametrize("window_samples", [100, 500])
def test_windows_of_the_reference_population_are_flagged_within_the_cut(
    window_samples: int,
) -> None:
    """Reference and window from one continuous distribution: the rate stays within the cut."""
    rng = np.random.default_rng(11)
    cut, trials, flagged = 0.05, 2000, 0
    for _ in range(trials):
        reference_values = rng.standard_t(3, size=200)
        edges = reference_edges(reference_values)
        reference = count_into(reference_values, edges)
        live = count_into(rng.standard_t(3, size=window_samples), edges)
        flagged += outside_chance(reference, live) <= cut
    assert flagged > 0  # the test is not blind: windows beyond the reference's extremes occur
    assert flagged / trials <= cut + 3 * math.sqrt(cut * (1 - cut) / trials)
