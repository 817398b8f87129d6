"""Scenario runs: windows in a row through the real binning, verdict and persistence, also judged
by the raw-sample tests and the fixed cut-offs."""

from __future__ import annotations

import argparse
import statistics as stats
from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

from driftbench.data import Group, feature_kind
from driftbench.scenarios import SCENARIOS, Scenario, changed
from driftbench.tally import METHODS, Tally, percent, score, window_scores
from edgefleet.drift import Histogram, count_into
from edgefleet.driftstats import Persistence, judge_window


def raw_tests(
    reference: np.ndarray, window: np.ndarray, ref: Histogram, live: Histogram
) -> dict[str, bool]:
    """The verdicts of the raw-sample tests on the same window: KS, chi-square on the cells."""
    ks = ks_2samp(reference[np.isfinite(reference)], window[np.isfinite(window)]).pvalue
    table = np.array([cells_apart(ref), cells_apart(live)])
    table = table[:, table.sum(axis=0) > 0]
    chi2 = table.shape[1] > 1 and chi2_contingency(table).pvalue < 0.05
    return {"KS p<.05": bool(ks < 0.05), "chi2 p<.05": bool(chi2)}


def cells_apart(histogram: Histogram) -> list[int]:
    """The cells of PSI and JS: values below and above the range apart, NaN last."""
    return [histogram.below, *histogram.counts, histogram.above, histogram.nan]


def at_least_one(text: str) -> int:
    """A count of at least 1."""
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


def run_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with the options of the scenario runs: window size, runs, windows a run, seed."""
    parser.add_argument("--window", type=at_least_one, default=500, help="samples per window")
    parser.add_argument(
        "--sequences", type=at_least_one, default=10, help="runs per scenario, x3 unshifted"
    )
    parser.add_argument("--windows", type=at_least_one, default=4, help="windows per run")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_group(
    scenario: Scenario, group: Group, args: argparse.Namespace, rng: np.random.Generator
) -> Tally:
    tally = Tally()
    unshifted = group.extract(group.held_out)
    judged = [f for f in group.references if changed(scenario.name, f, unshifted[f])]
    runs = args.sequences * (3 if scenario.name == "no shift" else 1)
    for _ in range(runs):
        run = scenario.for_run(group, judged, rng)
        persistence = {feature: Persistence() for feature in run.judged}
        opened_at: dict[str, int] = {}
        for index in range(1, args.windows + 1):
            values = group.extract(run.shift(group, args.window, rng))
            live = {
                feature: count_into(values[feature], reference.edges)
                for feature, (reference, _) in group.references.items()
            }
            window = judge_window(group.references, live)
            ours = window_scores(group.references, window)
            for verdict in window.features:
                feature = verdict.feature
                if feature not in persistence:
                    continue
                drifted = verdict.status == "drift"
                transition = persistence[feature].update(drifted)
                if transition == "open":
                    opened_at.setdefault(feature, index)
                tally.open_windows += transition in ("open", "still-open")
                reference_counts = group.references[feature][0]
                found = raw_tests(
                    group.reference_values[feature].reshape(-1),
                    values[feature].reshape(-1),
                    reference_counts,
                    live[feature],
                )
                for method, flagged in found.items():
                    tally.flagged[method] += flagged
                score(tally, verdict, ours[feature])
                tally.where.append(f"{group.name}: {feature_kind(group, feature)}")
        tally.runs += len(run.judged)
        tally.opened_by_two += sum(1 for delay in opened_at.values() if delay <= 2)
        tally.delays += list(opened_at.values())
    return tally


def row(name: str, tally: Tally) -> list[object]:
    return [
        name,
        tally.windows,
        *[percent(tally.flagged[m], tally.windows) for m in METHODS],
        percent(tally.open_windows, tally.windows),
        percent(tally.opened_by_two, tally.runs),
        stats.median(tally.delays) if tally.delays else "-",
    ]


HEADER = ["", "feature-windows", *[f"{m} %" for m in METHODS], "open %", "by 2 %", "delay"]


@dataclass(frozen=True)
class Draws:
    """The scenario runs' random draws: one stream for the scenarios, and one of its own for
    the one-input scenario, so that its draws leave every other scenario's as they were."""

    shared: np.random.Generator
    one_input: np.random.Generator

    @classmethod
    def seeded(cls, rng: np.random.Generator, seed: int) -> Draws:
        return cls(rng, np.random.default_rng([seed, 1]))

    def of(self, scenario: Scenario) -> np.random.Generator:
        return self.shared if scenario.one_input is None else self.one_input


def totals_at(
    size: int, groups: list[Group], args: argparse.Namespace, draws: Draws
) -> dict[str, Tally]:
    """Per scenario, the tallies of `groups` merged, at windows of `size` samples."""
    sized = argparse.Namespace(**{**vars(args), "window": size})
    return {
        scenario.name: reduce(
            Tally.merged,
            [
                run_group(scenario, group, sized, draws.of(scenario))
                for group in groups
                if scenario.applies(group)
            ],
            Tally(),
        )
        for scenario in SCENARIOS
    }
