"""Drift thresholds calibrated by resampling whole reference samples (see edgefleet.driftstats).

For each window size n, many times: draw a pseudo-reference of as many samples
as the reference has and a window of n samples, both with replacement from the
reference samples, count their values into the reference's bins and compute the
statistic's parts. Each part's upper 1% quantile over all the draws is its
level, and its mean excess over the level its tail scale (the "tail-max"
statistics measure each part's excess over its level in that scale, and take
the largest); nothing drifted between the two sides, so the statistic's upper
quantile at the false-alarm rate is the threshold, and the mean excess over it
fits the tail that smaller rates need. Drawing both sides accounts for the
reference's own finite size; drawing whole samples keeps a sample's values
(every pixel of an image) together, so their correlation raises the threshold
as it should.

A window drawn from the reference never holds a value outside the reference's
range, which a window of the same population does now and then. For features
of one value per sample, the PSI part ("tail-max-psi") weighs such values in
cells of their own, so each drawn window is given them as exchangeable samples
would hold them (`outside_draws`), taken from its outer bins, where the other
parts count them anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from edgefleet.driftstats import OUTSIDE_SHARE, PARTS, PSEUDO_COUNT, FeatureThresholds

PART_LEVEL_QUANTILE = 0.99
MIN_TAIL_SCALE = 0.2  # of a part that stays at its level without drift
DRAW_EXCEEDANCES = 40  # draws beyond the threshold, on average, that calibrate the tail
MIN_DRAWS = 1000
CHUNK = 256  # draws resampled at once (bounds the memory a large reference needs)
RAREST_OUTSIDE = 1e-12  # `outside_draws` leaves out counts rarer than this

# Rows of reference cell counts and rows of live ones to a value per row, or to a row of parts.
Statistics = Callable[[np.ndarray, np.ndarray], np.ndarray]


def sample_cells(per_sample_values: list[np.ndarray], edges: list[float]) -> np.ndarray:
    """Per sample, its value counts in the cells of edgefleet.driftstats (ordered bins, then NaN).

    The bins are those of edgefleet.drift.count_into; values outside the edges
    count in the outer bins.
    """
    bins = len(edges) - 1
    cells = np.zeros((len(per_sample_values), bins + 1), dtype=np.int64)
    for row, values in enumerate(per_sample_values):
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        nan = np.isnan(flat)
        positions = np.searchsorted(np.asarray(edges), flat[~nan], side="right") - 1
        cells[row, :bins] = np.bincount(np.clip(positions, 0, bins - 1), minlength=bins)
        cells[row, bins] = int(nan.sum())
    return cells


def _squared_z_sum(
    reference: np.ndarray,
    live: np.ndarray,
    reference_total: np.ndarray,
    live_total: np.ndarray,
    cumulative: bool,
) -> np.ndarray:
    """edgefleet.driftstats._squared_z_sum for rows (terms along the last axis)."""
    both = (reference_total > 0) & (live_total > 0)
    reference_safe = np.where(both, reference_total, 1)[:, None]
    live_safe = np.where(both, live_total, 1)[:, None]
    pooled = (reference + live + PSEUDO_COUNT) / (reference_total + live_total + 2 * PSEUDO_COUNT)[
        :, None
    ]
    variance = pooled * (1 - pooled) if cumulative else pooled
    difference = reference / reference_safe - live / live_safe
    weight = np.where(both[:, None], reference_safe * live_safe / (reference_safe + live_safe), 0)
    return np.asarray((weight * difference**2 / variance).sum(axis=1))


def cumulative_part(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """The statistic's sum over the boundaries between cells, for rows of cell counts."""
    return _squared_z_sum(
        np.cumsum(reference[:, :-1], axis=1),
        np.cumsum(live[:, :-1], axis=1),
        reference.sum(axis=1),
        live.sum(axis=1),
        cumulative=True,
    )


def cell_part(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """The statistic's sum over the cells (Pearson's chi-square), for rows of cell counts."""
    return _squared_z_sum(
        reference, live, reference.sum(axis=1), live.sum(axis=1), cumulative=False
    )


def both_parts(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Per row of cell counts (ordered bins, then NaN), the cumulative part and the cell part."""
    return np.stack([cumulative_part(reference, live), cell_part(reference, live)], axis=1)


def one_value_per_sample(cells: np.ndarray) -> bool:
    """Whether every sample of `sample_cells` adds one value: then the PSI part can be drawn."""
    return bool((cells.sum(axis=1) == 1).all())


def psi_part(reference: np.ndarray, live: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """edgefleet.driftstats.psi_part for rows of cell counts (ordered bins, then NaN).

    `outside` holds, per live row, its values below and above the range (two
    columns), which its outer bins include as `sample_cells` counts them; the
    reference rows hold none (the range is the reference's own).
    """
    bins = live.shape[1] - 1
    inside = live.astype(np.float64)
    inside[:, 0] -= outside[:, 0]
    inside[:, bins - 1] -= outside[:, 1]
    none = np.zeros(len(reference))
    live_cells = np.column_stack([outside[:, 0], inside[:, :bins], outside[:, 1], inside[:, bins]])
    reference_cells = np.column_stack([none, reference[:, :bins], none, reference[:, bins]])
    reference_total = reference_cells.sum(axis=1, keepdims=True)
    live_total = live_cells.sum(axis=1, keepdims=True)
    cells = live_cells.shape[1]
    reference_shares = (reference_cells + PSEUDO_COUNT) / (reference_total + PSEUDO_COUNT * cells)
    live_shares = (live_cells + PSEUDO_COUNT) / (live_total + PSEUDO_COUNT * cells)
    psi = ((live_shares - reference_shares) * np.log(live_shares / reference_shares)).sum(axis=1)
    weight = (reference_total * live_total / (reference_total + live_total))[:, 0]
    return np.asarray(weight * psi)


def outside_draws(
    reference_samples: int, window_samples: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Per draw, how many of a window's samples lie below, and above, every reference sample.

    When nothing drifted, the window's samples and the reference's are
    exchangeable: the chance that at least k of the window's n lie above all N
    of the reference's is C(n, k) / C(N + n, k), and the same below (where
    values repeat, less, so these counts are cautious). Each side is drawn from
    that law, apart from the other. Rows of two counts: below, above.
    """
    survival = [1.0]  # survival[k]: the chance of at least k
    while survival[-1] > RAREST_OUTSIDE and len(survival) <= window_samples:
        k = len(survival) - 1
        survival.append(
            survival[-1] * (window_samples - k) / (reference_samples + window_samples - k)
        )
    chance = rng.random((draws, 2))
    return np.searchsorted(-np.asarray(survival), -chance, side="right") - 1


def drawn_outside(reference: np.ndarray, live: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For live rows drawn from the reference, one value per sample: values outside the range.

    Per row, below and above, as `outside_draws` gives them for the rows'
    sample counts, and at most what the row's outer bins hold (they are taken
    from there; with one bin, both from it).
    """
    drawn = outside_draws(int(reference[0].sum()), int(live[0].sum()), len(live), rng)
    bins = live.shape[1] - 1
    below = np.minimum(drawn[:, 0], live[:, 0])
    room = live[:, bins - 1] - (below if bins == 1 else 0)
    return np.column_stack([below, np.minimum(drawn[:, 1], room)])


def parts_with_outside(rng: np.random.Generator) -> Statistics:
    """The three parts of "tail-max-psi" for drawn rows of one value per sample each."""

    def parts(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
        outside = drawn_outside(reference, live, rng)
        return np.column_stack([both_parts(reference, live), psi_part(reference, live, outside)])

    return parts


def statistics(
    reference: np.ndarray,
    live: np.ndarray,
    thresholds: FeatureThresholds | None = None,
    outside: np.ndarray | None = None,
) -> np.ndarray:
    """edgefleet.driftstats.statistic for rows of cell counts: the one `thresholds` name.

    `outside`: per live row, its values below and above the range (in its
    outer bins), which the PSI part weighs apart; none when not given.
    """
    parts = both_parts(reference, live)
    if thresholds is None:
        return combined(parts)
    if PARTS[thresholds.statistic] == 3:
        apart = np.zeros((len(live), 2)) if outside is None else outside
        parts = np.column_stack([parts, psi_part(reference, live, apart)])
    return combined(parts, thresholds.part_scales, thresholds.part_levels)


def combined(
    parts: np.ndarray,
    part_scales: tuple[float, ...] | None = None,
    part_levels: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Rows of parts to a statistic: "sum", "scaled-sum" (scales), tail-max ones (and levels)."""
    if part_scales is None:
        return np.asarray(parts.sum(axis=1))
    if part_levels is None:
        return np.asarray((parts / np.asarray(part_scales)).sum(axis=1))
    excess = (parts - np.asarray(part_levels)) / np.asarray(part_scales)
    return np.asarray(excess.max(axis=1))


def part_tails(parts: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each part's level (its upper 1% quantile) and tail scale (mean excess over the level).

    A part that stays at its level without drift (one cell) still gets a
    finite tail scale, MIN_TAIL_SCALE.
    """
    tails = [upper_tail(part, PART_LEVEL_QUANTILE) for part in parts.T]
    return (
        tuple(level for level, _ in tails),
        tuple(max(scale, MIN_TAIL_SCALE) for _, scale in tails),
    )


def upper_tail(values: np.ndarray, quantile: float) -> tuple[float, float]:
    """The `quantile` of `values`, and the mean excess over it of those beyond (0 if none are)."""
    level = float(np.quantile(values, quantile))
    beyond = values[values > level]
    return level, float((beyond - level).mean()) if beyond.size else 0.0


def _resampled(
    kinds: np.ndarray, shares: np.ndarray, size: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """`draws` rows of cell counts, each of `size` samples drawn with replacement.

    `kinds` are the distinct rows of per-sample cell counts and `shares` how
    often each occurs among the reference samples: drawing samples with
    replacement and grouping them by kind is one multinomial draw over the
    kinds, whose cost does not grow with `size` (a per-sample feature has at
    most one kind per cell).
    """
    return np.asarray(rng.multinomial(size, shares, size=draws) @ kinds)


def null_statistics(
    cells: np.ndarray,
    windows: Sequence[int],
    draws: int,
    rng: np.random.Generator,
    statistic: Statistics = statistics,
) -> dict[int, np.ndarray]:
    """Per window size, `draws` statistics between a resampled pseudo-reference and window.

    Each pseudo-reference serves every window size once. `statistic` maps rows
    of cell counts to a value per row, or to a row of values per row (both parts).
    """
    kinds, occurrences = np.unique(cells, axis=0, return_counts=True)
    shares = occurrences / occurrences.sum()
    results: dict[int, list[np.ndarray]] = {window: [] for window in windows}
    for start in range(0, draws, CHUNK):
        count = min(CHUNK, draws - start)
        reference = _resampled(kinds, shares, cells.shape[0], count, rng)
        for window in windows:
            live = _resampled(kinds, shares, window, count, rng)
            results[window].append(statistic(reference, live))
    return {window: np.concatenate(parts) for window, parts in results.items()}


def calibrate(
    per_sample_values: list[np.ndarray],
    edges: list[float],
    window_sizes: Sequence[int],
    false_alarms: Sequence[float],
    rng: np.random.Generator,
) -> FeatureThresholds:
    """Thresholds for windows of `window_sizes` samples (per_sample_values[i]: sample i's values).

    For the "tail-max-psi" statistic where every sample has one value, else
    (pooled values) "tail-max", whose parts leave out the PSI part: values
    outside the range cannot be drawn for samples of many values. With the
    parts' levels and tail scales measured on the same draws, and a share of
    the rate for the test of values outside the reference's range, which needs
    no calibration (`outside_chance` in edgefleet.driftstats). The thresholds
    are measured at the largest of `false_alarms` (with DRAW_EXCEEDANCES draws
    beyond each, on average); the smaller rates, and those that many features
    judged at once need, come from the fitted tail.
    """
    if not per_sample_values:
        raise ValueError("calibration needs at least one reference sample")
    if not window_sizes or min(window_sizes) < 1:
        raise ValueError("window sizes must be at least 1 sample")
    if not false_alarms or not all(0 < rate < 1 for rate in false_alarms):
        raise ValueError("false-alarm rates must be in (0, 1)")
    false_alarm = max(false_alarms)
    draws = max(MIN_DRAWS, math.ceil(DRAW_EXCEEDANCES / false_alarm))
    cells = sample_cells(per_sample_values, edges)
    one_value = one_value_per_sample(cells)
    parts_of = parts_with_outside(rng) if one_value else both_parts
    parts = null_statistics(cells, sorted(set(window_sizes)), draws, rng, parts_of)
    part_levels, part_scales = part_tails(np.concatenate(list(parts.values())))
    by_window: dict[int, float] = {}
    tail: dict[int, float] = {}
    for window, null_parts in parts.items():
        null = combined(null_parts, part_scales, part_levels)
        by_window[window], tail[window] = upper_tail(null, 1 - false_alarm)
    return FeatureThresholds(
        false_alarm=false_alarm,
        by_window=by_window,
        tail=tail,
        values_per_sample=float(cells.sum()) / cells.shape[0],
        statistic="tail-max-psi" if one_value else "tail-max",
        part_scales=part_scales,
        part_levels=part_levels,
        outside_share=OUTSIDE_SHARE,
    )
