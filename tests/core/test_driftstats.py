"""Drift verdicts from bin counts: the statistic, thresholds, judging and persistence."""

from __future__ import annotations

import math

import pytest
from scipy.spatial.distance import jensenshannon

from edgefleet.drift import Histogram
from edgefleet.driftstats import (
    PSEUDO_COUNT,
    FeatureThresholds,
    Persistence,
    js_distance,
    judge_feature,
    judge_window,
    psi,
    psi_part,
    statistic,
    statistic_parts,
    tail_probability,
    threshold_at,
)

EDGES = [0.0, 1.0, 2.0, 3.0, 4.0]
REFERENCE = Histogram(edges=EDGES, counts=[250, 250, 250, 250])
THRESHOLDS = FeatureThresholds(
    false_alarm=0.01, by_window={100: 20.0, 400: 30.0, 1600: 34.0}, tail={100: 2.0, 400: 4.0}
)


def live(counts: list[int], below: int = 0, above: int = 0, nan: int = 0) -> Histogram:
    return Histogram(edges=EDGES, counts=counts, below=below, above=above, nan=nan)


def test_a_window_shaped_like_the_reference_scores_zero_and_a_shift_scores_more() -> None:
    assert statistic(REFERENCE, live([100, 100, 100, 100])) == pytest.approx(0.0, abs=1e-3)
    slight = statistic(REFERENCE, live([80, 100, 100, 120]))
    strong = statistic(REFERENCE, live([40, 80, 120, 160]))
    assert 0 < slight < strong


def test_a_change_of_spread_is_seen_although_the_middle_stays() -> None:
    spread = live([150, 50, 50, 150])
    assert statistic(REFERENCE, spread) > statistic(REFERENCE, live([90, 110, 110, 90])) * 10


def test_values_outside_the_edges_count_in_the_outer_bins() -> None:
    folded = statistic(REFERENCE, live([130, 100, 100, 70]))
    outside = statistic(REFERENCE, live([100, 100, 100, 50], below=30, above=20))
    assert outside == pytest.approx(folded)


def test_missing_values_are_a_cell_of_their_own() -> None:
    same_shape = live([90, 90, 90, 90], nan=40)
    assert statistic(REFERENCE, same_shape) > statistic(REFERENCE, live([100, 100, 100, 100])) + 30
    assert psi(REFERENCE, same_shape) > 0


def test_counts_in_other_bins_are_refused() -> None:
    other = Histogram(edges=[0.0, 1.0, 2.0, 3.0, 5.0], counts=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="other bin edges"):
        statistic(REFERENCE, other)


def test_psi_and_js_are_the_textbook_formulas_over_the_same_cells() -> None:
    window = live([40, 80, 120, 160], below=2, above=5, nan=3)
    # the bins, with the values below and above the range apart, and NaN last
    reference_cells = [count + PSEUDO_COUNT for count in [0, *REFERENCE.counts, 0, 0]]
    live_cells = [count + PSEUDO_COUNT for count in [2, 40, 80, 120, 160, 5, 3]]
    reference_shares = [c / sum(reference_cells) for c in reference_cells]
    live_shares = [c / sum(live_cells) for c in live_cells]
    expected_psi = sum(
        (b - a) * math.log(b / a) for a, b in zip(reference_shares, live_shares, strict=True)
    )
    assert psi(REFERENCE, window) == pytest.approx(expected_psi)
    assert js_distance(REFERENCE, window) == pytest.approx(
        float(jensenshannon(reference_shares, live_shares))
    )
    assert js_distance(REFERENCE, REFERENCE) == pytest.approx(0.0, abs=1e-7)


def test_threshold_is_missing_below_the_smallest_window_and_flat_above_the_largest() -> None:
    assert threshold_at(THRESHOLDS, 99) is None
    assert threshold_at(THRESHOLDS, 100) == 20.0
    assert threshold_at(THRESHOLDS, 1600) == 34.0
    assert threshold_at(THRESHOLDS, 100_000) == 34.0


def test_threshold_between_windows_is_linear_in_the_logarithm_of_the_sample_count() -> None:
    assert threshold_at(THRESHOLDS, 200) == pytest.approx(25.0)  # halfway from 100 to 400
    assert threshold_at(THRESHOLDS, 800) == pytest.approx(32.0)


def test_smaller_false_alarm_rates_follow_the_exponential_tail() -> None:
    assert threshold_at(THRESHOLDS, 100, 0.001) == pytest.approx(20.0 + 2.0 * math.log(10))
    assert threshold_at(THRESHOLDS, 200, 0.001) == pytest.approx(25.0 + 3.0 * math.log(10))
    # no tail calibrated at 1600: the cautious tail, exponential from zero through the threshold
    cautious = 34.0 / math.log(100)
    assert threshold_at(THRESHOLDS, 1600, 0.001) == pytest.approx(34.0 + cautious * math.log(10))
    with pytest.raises(ValueError, match="false_alarm"):
        threshold_at(THRESHOLDS, 100, 0.05)


def test_thresholds_refuse_a_tail_without_a_threshold() -> None:
    with pytest.raises(ValueError, match="tail"):
        FeatureThresholds(false_alarm=0.01, by_window={100: 1.0}, tail={200: 1.0})


def test_thresholds_are_judged_with_the_statistic_they_name() -> None:
    window = live([150, 50, 50, 150])
    cumulative, cells = statistic_parts(REFERENCE, window)
    scaled = THRESHOLDS.model_copy(update={"statistic": "scaled-sum", "part_scales": (8.0, 4.0)})
    verdict = judge_feature("x", REFERENCE, scaled, window)
    assert verdict.statistic == pytest.approx(cumulative / 8.0 + cells / 4.0)
    assert verdict.status == "ok"  # 23.7 against 30, where the plain sum (117) drifts


def test_tail_max_judges_by_the_part_that_is_the_less_likely() -> None:
    tail_max = THRESHOLDS.model_copy(
        update={
            "tail": {100: 1.0, 400: 1.0, 1600: 1.0},
            "by_window": {100: 0.5, 400: 0.5, 1600: 0.5},
            "statistic": "tail-max",
            "part_scales": (4.0, 2.0),
            "part_levels": (14.0, 8.0),
        }
    )
    spread = live([150, 50, 50, 150])  # cumulative shares barely move; the cells do
    cumulative, cells = statistic_parts(REFERENCE, spread)
    verdict = judge_feature("x", REFERENCE, tail_max, spread)
    assert verdict.statistic == pytest.approx(max((cumulative - 14) / 4, (cells - 8) / 2))
    assert verdict.statistic == pytest.approx((cells - 8) / 2) and verdict.status == "drift"
    calm = judge_feature("x", REFERENCE, tail_max, live([98, 102, 101, 99]))
    assert calm.statistic < 0 and calm.status == "ok"  # both parts below their 1% levels


def test_the_psi_part_weighs_values_beyond_the_range_that_the_outer_bins_would_absorb() -> None:
    tail_max_psi = THRESHOLDS.model_copy(
        update={
            "tail": {100: 1.0, 400: 1.0, 1600: 1.0},
            "by_window": {100: 0.5, 400: 0.5, 1600: 0.5},
            "statistic": "tail-max-psi",
            "part_scales": (4.0, 2.0, 2.0),
            "part_levels": (14.0, 8.0, 8.0),
        }
    )
    inside = live([90, 100, 100, 110])
    beyond = live([90, 100, 100, 104], above=6)  # six of the last bin's values beyond the range
    assert statistic_parts(REFERENCE, beyond) == pytest.approx(statistic_parts(REFERENCE, inside))
    weight = 1000 * 400 / 1400
    assert psi_part(REFERENCE, beyond) == pytest.approx(weight * psi(REFERENCE, beyond))
    assert psi_part(REFERENCE, inside) < 8.0 < psi_part(REFERENCE, beyond)
    calm = judge_feature("x", REFERENCE, tail_max_psi, inside)
    assert calm.status == "ok"
    verdict = judge_feature("x", REFERENCE, tail_max_psi, beyond)
    assert verdict.statistic == pytest.approx((psi_part(REFERENCE, beyond) - 8.0) / 2.0)
    assert verdict.status == "drift"


def test_tail_max_psi_has_three_parts() -> None:
    for parts in ((1.0, 1.0), (1.0, 1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="one per part"):
            FeatureThresholds(
                false_alarm=0.01,
                by_window={100: 0.5},
                tail={100: 1.0},
                statistic="tail-max-psi",
                part_scales=parts,
                part_levels=parts,
            )
    with pytest.raises(ValueError, match="one per part"):
        FeatureThresholds(
            false_alarm=0.01,
            by_window={100: 0.5},
            tail={100: 1.0},
            statistic="tail-max",
            part_scales=(1.0, 1.0, 1.0),
            part_levels=(1.0, 1.0, 1.0),
        )


def test_tail_max_needs_its_levels_and_a_tail_at_every_window() -> None:
    with pytest.raises(ValueError, match="part_levels"):
        FeatureThresholds(
            false_alarm=0.01, by_window={100: 2.0}, statistic="tail-max", part_scales=(1.0, 1.0)
        )
    with pytest.raises(ValueError, match="part_levels"):
        FeatureThresholds(
            false_alarm=0.01,
            by_window={100: 2.0},
            statistic="scaled-sum",
            part_scales=(1.0, 1.0),
            part_levels=(1.0, 1.0),
        )
    with pytest.raises(ValueError, match="every window"):
        FeatureThresholds(
            false_alarm=0.01,
            by_window={100: -0.2, 400: 0.1},
            tail={100: 1.0},
            statistic="tail-max",
            part_scales=(1.0, 1.0),
            part_levels=(1.0, 1.0),
        )
    with pytest.raises(ValueError, match="negative"):  # sums of squares: never below zero
        FeatureThresholds(false_alarm=0.01, by_window={100: -0.2})


def test_thresholds_that_name_no_statistic_are_judged_with_the_plain_sum() -> None:
    written_before = '{"false_alarm": 0.01, "by_window": {"100": 20.0, "400": 30.0}}'
    thresholds = FeatureThresholds.model_validate_json(written_before)
    assert thresholds.statistic == "sum"
    window = live([150, 50, 50, 150])
    cumulative, cells = statistic_parts(REFERENCE, window)
    verdict = judge_window({"x": (REFERENCE, thresholds)}, {"x": window}).features[0]
    assert verdict.statistic == pytest.approx(cumulative + cells)
    assert verdict.status == "drift"


def test_the_scaled_sum_needs_its_part_scales_and_only_it_has_them() -> None:
    with pytest.raises(ValueError, match="part_scales"):
        FeatureThresholds(false_alarm=0.01, by_window={100: 2.0}, statistic="scaled-sum")
    with pytest.raises(ValueError, match="part_scales"):
        FeatureThresholds(false_alarm=0.01, by_window={100: 20.0}, part_scales=(8.0, 4.0))
    with pytest.raises(ValueError, match="positive"):
        FeatureThresholds(
            false_alarm=0.01, by_window={100: 2.0}, statistic="scaled-sum", part_scales=(0.0, 4.0)
        )


def test_a_feature_without_thresholds_or_with_too_few_samples_is_insufficient() -> None:
    shifted = live([10, 20, 30, 40])
    assert judge_feature("x", REFERENCE, None, shifted).status == "insufficient"
    few = judge_feature("x", REFERENCE, THRESHOLDS, shifted)
    assert few.samples == 100 and few.status == "drift"
    fewer = judge_feature("x", REFERENCE, THRESHOLDS, live([10, 20, 30, 39]))
    assert (fewer.samples, fewer.threshold, fewer.status) == (99, None, "insufficient")


def test_pooled_values_are_counted_as_samples() -> None:
    pooled = THRESHOLDS.model_copy(update={"values_per_sample": 64.0})
    window = live([1600, 1600, 1600, 1600])  # 6400 values: 100 samples
    verdict = judge_feature("image[c0]", REFERENCE, pooled, window)
    assert (verdict.samples, verdict.threshold) == (100, 20.0)


def test_a_share_of_the_rate_raises_the_threshold_along_the_tail() -> None:
    window = live([70, 100, 100, 130])
    whole = judge_feature("x", REFERENCE, THRESHOLDS, window)
    tenth = judge_feature("x", REFERENCE, THRESHOLDS, window, rate_share=0.1)
    assert whole.threshold is not None and tenth.threshold is not None
    assert tenth.threshold == pytest.approx(whole.threshold + 4.0 * math.log(10))
    assert whole.statistic == tenth.statistic
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="rate_share"):
            judge_feature("x", REFERENCE, THRESHOLDS, window, rate_share=share)


def test_a_window_is_dataset_drift_when_half_the_judged_features_drift() -> None:
    calm, shifted = live([100, 100, 100, 100]), live([10, 40, 150, 200])
    references: dict[str, tuple[Histogram, FeatureThresholds | None]] = {
        name: (REFERENCE, THRESHOLDS) for name in "abcd"
    }
    references["unthresholded"] = (REFERENCE, None)
    one = judge_window(references, {"a": shifted, "b": calm, "c": calm, "d": calm})
    assert one.drifted == ["a"] and not one.dataset_drift
    assert [verdict.feature for verdict in one.features] == ["a", "b", "c", "d"]
    two = judge_window(
        references, {"a": shifted, "b": shifted, "c": calm, "d": calm, "unthresholded": shifted}
    )
    assert two.drifted == ["a", "b"] and two.dataset_drift
    # four features judged, two of them drift: each is judged at half the false-alarm rate
    assert two.features[0].threshold == pytest.approx(30.0 + 4.0 * math.log(2))
    assert two.features[-1].status == "insufficient"


def test_features_found_drifting_ease_the_cut_for_the_others_benjamini_hochberg() -> None:
    strong, moderate = live([40, 100, 100, 160]), live([71, 100, 100, 129])
    references = {name: (REFERENCE, THRESHOLDS) for name in "abcd"}
    moderate_alone = judge_feature("c", REFERENCE, THRESHOLDS, moderate, rate_share=0.25)
    assert moderate_alone.status == "ok"  # Bonferroni's division by four would miss it
    verdict = judge_window(
        references, {"a": strong, "b": strong, "c": moderate, "d": live([100, 100, 100, 100])}
    )
    # Three of four within 3/4 of the rate: every feature is judged at that cut.
    thresholds = [feature.threshold for feature in verdict.features]
    assert thresholds == pytest.approx([30.0 + 4.0 * math.log(4 / 3)] * 4)
    assert verdict.drifted == ["a", "b", "c"] and verdict.dataset_drift


def test_a_little_drift_in_every_feature_is_found_where_one_alone_is_not() -> None:
    slight, calm = live([72, 100, 100, 128]), live([100, 100, 100, 100])
    references = {name: (REFERENCE, THRESHOLDS) for name in "abcd"}
    each = judge_feature("a", REFERENCE, THRESHOLDS, slight)
    assert each.threshold is not None and 30.0 < each.statistic < 30.0 + 4.0 * math.log(4)
    alone = judge_window(references, {"a": slight, "b": calm, "c": calm, "d": calm})
    assert alone.drifted == []  # judged at a quarter of the rate
    together = judge_window(references, dict.fromkeys("abcd", slight))
    assert together.drifted == ["a", "b", "c", "d"]  # each within the whole rate
    assert [feature.threshold for feature in together.features] == pytest.approx([30.0] * 4)


def test_tail_probability_matches_the_thresholds() -> None:
    threshold = threshold_at(THRESHOLDS, 400, 0.002)
    assert threshold is not None
    assert tail_probability(THRESHOLDS, 400, threshold) == pytest.approx(0.002)
    assert tail_probability(THRESHOLDS, 400, 1.0) == 0.01
    assert tail_probability(THRESHOLDS, 50, 100.0) is None


def test_no_judged_feature_is_no_dataset_drift() -> None:
    verdict = judge_window({"a": (REFERENCE, None)}, {"a": live([0, 0, 0, 400])})
    assert not verdict.dataset_drift and verdict.drifted == []


def test_persistence_opens_and_closes_after_consecutive_windows() -> None:
    persistence = Persistence(windows=2)
    opening = [persistence.update(d) for d in [True, False, True, True]]
    assert opening == ["quiet", "quiet", "quiet", "open"]
    closing = [persistence.update(d) for d in [False, True, False, True, False, False, False]]
    assert closing == [
        "still-open",
        "still-open",
        "still-open",
        "still-open",
        "still-open",
        "close",
        "quiet",
    ]


def test_persistence_state_survives_a_round_trip_mid_streak() -> None:
    persistence = Persistence(windows=3)
    persistence.update(True)
    persistence.update(True)
    restored = Persistence.from_json(persistence.to_json())
    assert restored.update(True) == "open"
    assert Persistence.from_json(restored.to_json()).is_open
