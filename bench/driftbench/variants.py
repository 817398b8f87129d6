"""The statistic against its parts and other combinations, each calibrated the same way."""

from __future__ import annotations

import argparse

import numpy as np

from driftbench.data import FALSE_ALARM, Group
from driftbench.scenarios import SCENARIOS, changed
from driftbench.tally import percent
from edgefleet.converter.driftcal import (
    Statistics,
    both_parts,
    combined,
    drawn_outside,
    null_statistics,
    one_value_per_sample,
    part_tails,
    psi_part,
    sample_cells,
)
from edgefleet.drift import Histogram, count_into
from edgefleet.driftstats import PSEUDO_COUNT


def cells(histogram: Histogram) -> list[int]:
    """The statistic's cells: values outside the range folded into the outer bins, NaN last."""
    ordered = list(histogram.counts)
    ordered[0] += histogram.below
    ordered[-1] += histogram.above
    return [*ordered, histogram.nan]


VARIANTS = [
    "the plain sum",
    "its cumulative part",
    "its cell part",
    "the larger part, scaled",
    "the sum, scaled (before)",
    "the sum with a spread part, scaled",
    "the two parts' larger excess, in tail scales (before)",
    "the statistic (with the PSI part, the largest excess)",
    "JS distance, calibrated",
]


COMPARE_DRAWS = 2000


COMPARE_WINDOWS = 20


def spread_part(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A candidate third part: the squared contrast of the cumulative z-scores about the middle.

    A wider window has more values below the boundaries under the reference's
    median and fewer below those above it: the boundaries' z-scores take
    opposite signs on either side, which the contrast (those above minus those
    below) adds up where the cumulative part's squares treat them apart.
    """
    below = np.cumsum(reference[:, :-2], axis=1)
    live_below = np.cumsum(live[:, :-2], axis=1)
    reference_total, live_total = reference.sum(axis=1)[:, None], live.sum(axis=1)[:, None]
    pooled = (below + live_below + PSEUDO_COUNT) / (reference_total + live_total + 2 * PSEUDO_COUNT)
    weight = reference_total * live_total / (reference_total + live_total)
    z = (below / reference_total - live_below / live_total) * np.sqrt(
        weight / (pooled * (1 - pooled))
    )
    side = np.where(below / reference_total < 0.5, -1.0, 1.0)
    return np.asarray((side * z).sum(axis=1) ** 2)


def js_distances(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """edgefleet.driftstats.js_distance for rows of cell counts."""
    reference_shares, live_shares = (
        (counts + PSEUDO_COUNT) / (counts + PSEUDO_COUNT).sum(axis=1, keepdims=True)
        for counts in (reference, live)
    )
    middle = (reference_shares + live_shares) / 2
    divergence = (
        reference_shares * np.log(reference_shares / middle)
        + live_shares * np.log(live_shares / middle)
    ).sum(axis=1) / 2
    return np.asarray(np.sqrt(np.maximum(divergence, 0.0)))


STATISTIC_PARTS = [0, 1, 4]  # of `compared_parts`: the cumulative, the cell and the PSI part


def compared_parts(reference: np.ndarray, live: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Per row of cell counts: the statistic's two parts, a candidate spread part, JS, and the
    PSI part (`outside`: the live rows' values below and above the range, in their outer bins)."""
    return np.column_stack(
        [
            both_parts(reference, live),
            spread_part(reference, live),
            js_distances(reference, live),
            psi_part(reference, live, outside),
        ]
    )


def compared_null(one_value: bool, rng: np.random.Generator) -> Statistics:
    """`compared_parts` of drawn rows; with one value per sample, with values outside the range
    drawn as the calibration draws them (pooled values: none, and no PSI part, as calibrated)."""

    def parts(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
        outside = drawn_outside(reference, live, rng) if one_value else np.zeros((len(live), 2))
        return compared_parts(reference, live, outside)

    return parts


def every_variant(
    parts: np.ndarray,
    scales: np.ndarray,
    tails: tuple[tuple[float, ...], tuple[float, ...]],
    one_value: bool,
) -> np.ndarray:
    """Per row of `compared_parts`, each variant's value (`scales`: each one's null quantile;
    `tails`: the statistic's parts' levels and tail scales, `part_tails`; `one_value`: one value
    per sample, where the statistic has the PSI part)."""
    scaled = parts / np.maximum(scales, 1e-12)
    two, plain = scaled[:, :2], parts[:, :2]
    with_spread = scaled[:, :3].sum(axis=1)
    levels, tail_scales = tails
    before = combined(plain, part_scales=tail_scales[:2], part_levels=levels[:2])
    statistic = (
        combined(parts[:, STATISTIC_PARTS], part_scales=tail_scales, part_levels=levels)
        if one_value
        else before
    )
    return np.stack(
        [
            plain.sum(axis=1),
            *plain.T,
            two.max(axis=1),
            two.sum(axis=1),
            with_spread,
            before,
            statistic,
            parts[:, 3],
        ],
        axis=1,
    )


def compare_statistics(
    groups: list[Group], args: argparse.Namespace, rng: np.random.Generator
) -> list[list[object]]:
    """Per scenario, the share of feature-windows each variant flags at its own 1% threshold."""
    cuts, scales, tails, totals, one_value = {}, {}, {}, {}, {}
    for group in groups:
        for feature, (reference, _) in group.references.items():
            samples = [np.atleast_1d(row) for row in group.reference_values[feature]]
            per_sample = sample_cells(samples, reference.edges)
            one_value[feature] = one_value_per_sample(per_sample)
            drawn = compared_null(one_value[feature], rng)
            null = null_statistics(per_sample, [args.window], COMPARE_DRAWS, rng, drawn)
            scales[feature] = np.quantile(null[args.window], 1 - FALSE_ALARM, axis=0)
            tails[feature] = part_tails(null[args.window][:, STATISTIC_PARTS])
            variants = every_variant(
                null[args.window], scales[feature], tails[feature], one_value[feature]
            )
            cuts[feature] = np.quantile(variants, 1 - FALSE_ALARM, axis=0)
            totals[feature] = per_sample.sum(axis=0)[None]
    table: list[list[object]] = [["scenario", "feature-windows", *(f"{v} %" for v in VARIANTS)]]
    # A one-input shift is, for a feature judged alone, the all-inputs mean shift.
    for scenario in (scenario for scenario in SCENARIOS if scenario.one_input is None):
        flagged, windows = np.zeros(len(VARIANTS)), 0
        for group in (g for g in groups if scenario.applies(g)):
            unshifted = group.extract(group.held_out)
            judged = [f for f in group.references if changed(scenario.name, f, unshifted[f])]
            for _ in range(COMPARE_WINDOWS):
                values = group.extract(scenario.shift(group, args.window, rng))
                for feature in judged:
                    live = count_into(values[feature], group.references[feature][0].edges)
                    outside = np.array([[live.below, live.above]])
                    parts = compared_parts(totals[feature], np.array([cells(live)]), outside)
                    found = every_variant(
                        parts, scales[feature], tails[feature], one_value[feature]
                    )[0]
                    flagged += found > cuts[feature]
                    windows += 1
        table.append([scenario.name, windows, *(percent(int(f), windows) for f in flagged)])
    return table
