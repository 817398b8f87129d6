"""The calm rate: references and windows drawn from each data set's population."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.stats import beta

from driftbench.data import Group, References, calibrated, feature_kind, population_rows
from driftbench.tally import (
    WHOLE_WINDOW_METHODS,
    Tally,
    percent,
    score,
    score_whole,
    window_scores,
)
from edgefleet.drift import count_into
from edgefleet.driftstats import Persistence, judge_window
from edgefleet.tables import format_columns

CALM_SIZES = (100, 200, 500)  # the calm rate is measured at these and --window, --window-sizes


CALM_REFERENCES = 10  # per data set, drawn from its population (--calm-references)


CALM_WINDOWS = 100  # per reference and window size (--calm-windows)


# Every this many windows of a feature's run, its alert's state is also counted apart: states
# this far apart are independent trials but for a rare chance (`Calm.spaced_open_bound`).
OPEN_SPACING = 5


@dataclass
class Calm:
    """Calm feature-windows (no shift): judged, drifted, alert open; and of every
    `OPEN_SPACING`-th window of a feature's run, how many and how many with an alert open."""

    windows: int = 0
    drifted: int = 0
    open: int = 0
    spaced: int = 0
    spaced_open: int = 0

    def merged(self, other: Calm) -> Calm:
        return Calm(
            self.windows + other.windows,
            self.drifted + other.drifted,
            self.open + other.open,
            self.spaced + other.spaced,
            self.spaced_open + other.spaced_open,
        )

    def open_bound(self) -> float:
        """The 95% upper bound of the share of windows with an alert open, in a long run.

        An alert is open in a window only if that window or the one before
        drifted (it opens on a second drifted window and closes on a second
        calm one), so the share open is at most twice the share drifted. Given
        its reference, each window is an independent draw from the population,
        an independent trial: the bound is twice Clopper-Pearson's upper end
        for the share drifted (counting the features of a window, and the
        windows of one reference, as independent: see `calm_population`).
        """
        if not self.windows:
            return 1.0
        return min(1.0, 2 * clopper_pearson(self.drifted, self.windows)[1])

    def spaced_open_bound(self) -> float:
        """The 95% upper bound of the share of windows with an alert open, from the alert's
        state every `OPEN_SPACING`-th window of a feature's run (Clopper-Pearson's upper end).

        It bounds what `open_bound` bounds, the share open itself, and not through the share
        drifted. Two calm windows in a row close an alert, or leave it closed, whatever came
        before (`Persistence`), so the states of two windows are independent, given their
        reference, unless no two windows in a row between them are calm. `OPEN_SPACING`
        windows apart, that takes at least two of the five drifted (01010 and no fewer ones),
        a chance of about p squared for a feature that drifts in a share p of windows (one in
        10,000 at 1%). Counted as independent trials, as `open_bound` counts the windows.
        """
        if not self.spaced:
            return 1.0
        return clopper_pearson(self.spaced_open, self.spaced)[1]


# Per window size, per reference drawn, per feature kind: the calm feature-windows.
CalmTally = dict[int, list[dict[str, Calm]]]


def calm_population(
    group: Group, sizes: list[int], references: int, windows: int, rng: np.random.Generator
) -> tuple[CalmTally, dict[int, Tally]]:
    """Calm windows and their references, all drawn with replacement from the population.

    `references` times: a reference of as many rows as the data set's,
    calibrated as `with_references` does; against it, at each size, `windows`
    windows (`calm_windows`). The reference and every window are i.i.d.
    samples of one distribution, the population's rows, which is what the
    calibration promises its rate for; given the reference, the windows are
    independent trials, as many as time allows. The rate is that of this
    discrete distribution (rows repeat), not of the world the rows came from;
    the windows of one reference share it, so the rate differs from one
    reference to another (hence the tally per reference); the features of a
    window share its rows. Also returns, per size, every feature-window's scores.
    """
    tally: CalmTally = {size: [] for size in sizes}
    scored = {size: Tally() for size in sizes}
    for _ in range(references):
        reference_rows = population_rows(group, group.reference_rows, rng)
        reference = calibrated(group.extract, reference_rows, rng)[1]
        for size in sizes:
            tally[size].append(calm_windows(group, reference, size, windows, rng, scored[size]))
    return tally, scored


def calm_windows(
    group: Group,
    reference: References,
    size: int,
    windows: int,
    rng: np.random.Generator,
    scored: Tally,
) -> dict[str, Calm]:
    """Per feature kind, `windows` windows of `size` rows from the population, judged in a row.

    Each feature's windows pass through one `Persistence`, as a device's do.
    Each feature-window's verdict and scores (ours, PSI, JS) go into `scored`,
    the calm side of the goal against the fixed cut-offs (`matched`), and so
    does each window as a whole (`score_whole`).
    """
    # Every window's rows at once: a row's feature values depend on that row alone.
    values = group.extract(population_rows(group, size * windows, rng))
    persistence = {feature: Persistence() for feature in reference}
    by_kind: dict[str, Calm] = {}
    for index, start in enumerate(range(0, size * windows, size)):
        spaced = (index + 1) % OPEN_SPACING == 0
        live = {
            feature: count_into(values[feature][start : start + size], histogram.edges)
            for feature, (histogram, _) in reference.items()
        }
        window = judge_window(reference, live)
        ours = window_scores(reference, window)
        judged = [verdict for verdict in window.features if verdict.status != "insufficient"]
        score_whole(scored, judged)
        for verdict in judged:
            drifted = verdict.status == "drift"
            transition = persistence[verdict.feature].update(drifted)
            calm = by_kind.setdefault(feature_kind(group, verdict.feature), Calm())
            calm.windows += 1
            calm.drifted += drifted
            is_open = transition in ("open", "still-open")
            calm.open += is_open
            calm.spaced += spaced
            calm.spaced_open += spaced and is_open
            score(scored, verdict, ours[verdict.feature])
            scored.where.append(f"{group.name}: {feature_kind(group, verdict.feature)}")
    return by_kind


def of_kind(by_kind: dict[str, Calm], kind: str) -> Calm:
    """The calm windows of one feature kind, or of every kind ("all")."""
    chosen = by_kind.values() if kind == "all" else [by_kind.get(kind, Calm())]
    return reduce(Calm.merged, chosen, Calm())


def calm_table(
    groups: list[Group], tallies: dict[str, CalmTally], sizes: list[int]
) -> dict[int, Calm]:
    """Print, per window size and feature kind, the calm windows; per data set, each reference's.

    Returns, per size, every feature's windows merged.
    """
    table: list[list[object]] = [
        [
            "samples",
            "feature kind",
            "data sets",
            "feature-windows",
            "drifted",
            "drifted %",
            "open",
            "open %",
            "open, 95% upper bound %",
            f"open every {OPEN_SPACING}th window",
            "its 95% upper bound %",
            "one reference, most drifted %",
        ]
    ]
    totals = {}
    for size in sizes:
        references = [(name, by_kind) for name, tally in tallies.items() for by_kind in tally[size]]
        kinds = sorted({kind for _, by_kind in references for kind in by_kind})
        for kind in [*kinds, "all"]:
            chosen = [(name, of_kind(by_kind, kind)) for name, by_kind in references]
            chosen = [(name, calm) for name, calm in chosen if calm.windows]
            calm = reduce(Calm.merged, (calm for _, calm in chosen), Calm())
            sets = (
                "every one above"
                if kind == "all"
                else ", ".join(dict.fromkeys(n for n, _ in chosen))
            )
            table.append(
                [
                    size,
                    kind,
                    sets,
                    calm.windows,
                    calm.drifted,
                    percent(calm.drifted, calm.windows, 2),
                    calm.open,
                    percent(calm.open, calm.windows, 2),
                    f"{100 * calm.open_bound():.2f}",
                    f"{calm.spaced_open} of {calm.spaced}",
                    f"{100 * calm.spaced_open_bound():.2f}",
                    f"{100 * max((c.drifted / c.windows for _, c in chosen), default=0):.2f}",
                ]
            )
        totals[size] = calm
    print(format_columns(table, rule=True))
    print(
        "\nPer data set (population rows / reference rows), each reference's drifted "
        "feature-windows, of those judged against it:"
    )
    per_set: list[list[object]] = [
        ["data set", "samples", "judged per reference", "drifted, per reference"]
    ]
    for group in groups:
        for size in sizes:
            calms = [of_kind(by_kind, "all") for by_kind in tallies[group.name][size]]
            judged = sorted({calm.windows for calm in calms})
            per_set.append(
                [
                    f"{group.name} ({len(group.population)}/{group.reference_rows})",
                    size,
                    f"{judged[0]}" if len(judged) == 1 else f"{judged[0]}-{judged[-1]}",
                    " ".join(str(calm.drifted) for calm in calms),
                ]
            )
    print(format_columns(per_set, rule=True))
    return totals


def print_whole_windows(groups: list[Group], scored: dict[str, dict[int, Tally]]) -> None:
    """Per data set and window size, the calm windows in which ours and each fixed cut-off flag
    any feature (before persistence): what an operator sees, a device's window with an alarm.

    `scored`: per data set and size, the calm side (`calm_population`).
    """
    table: list[list[object]] = [
        [
            "data set",
            "samples",
            "windows",
            "features judged",
            *[f"{m} %" for m in WHOLE_WINDOW_METHODS],
        ]
    ]
    for group in groups:
        for size, tally in scored[group.name].items():
            table.append(
                [
                    group.name,
                    size,
                    tally.whole_windows,
                    f"{tally.windows / tally.whole_windows:.1f}" if tally.whole_windows else "-",
                    *[
                        percent(tally.windows_flagged[m], tally.whole_windows, 1)
                        for m in WHOLE_WINDOW_METHODS
                    ],
                ]
            )
    print(
        "\nCalm windows from the populations with a false alarm on any feature, before "
        "persistence (ours shares its 1% among the window's features; a fixed cut-off judges "
        "each feature alone, so its alarms grow with the features judged):"
    )
    print(format_columns(table, rule=True))


def clopper_pearson(hits: int, trials: int) -> tuple[float, float]:
    """Clopper-Pearson's 95% interval for `hits` in `trials` independent trials."""
    low = float(beta.ppf(0.025, hits, trials - hits + 1)) if hits > 0 else 0.0
    high = float(beta.ppf(0.975, hits + 1, trials - hits)) if hits < trials else 1.0
    return low, high
