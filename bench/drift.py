"""Benchmark: drift verdicts from bin counts, against raw-sample tests and fixed cut-offs.

Data that packages ship, nothing downloaded: scikit-learn's bundled data sets
(breast_cancer, wine, digits, diabetes, iris; digits also as 8x8 images) and
16x16 patches of scikit-image's bundled pictures. Each is split into fit (a
model is trained on it: logistic regression for classes, ridge for diabetes),
reference and held-out rows (20/40/40%). Features: every column with at least 5
distinct values and the model's outputs (top-1 class and confidence, or the
prediction); for images the pooled pixels (32 per image, as a device subsamples
a large tensor) and each image's mean and standard deviation.

Through the real code: bins from `edgefleet.drift.quantile_edges` on the
reference, thresholds from `edgefleet.converter.driftcal.calibrate` (false
alarm 1% per window, windows of 100 to 2000 samples), windows counted with
`count_into` and judged with `edgefleet.driftstats.judge_window` (the 1% shared
among each data set's features) and `Persistence` (2 windows).

The held-out rows are few, so windows of --window samples are drawn from them
WITH REPLACEMENT (bootstrap), --sequences runs of --windows windows per
scenario and data set (three times as many without shift); a shift is applied
to the drawn rows before the model and the counts. Where the held-out rows are
fewer than a window's samples, the windows repeat rows and carry the held-out
rows' own sampling difference from the reference as if it were a shift: the
goals are judged on the data sets with enough held-out rows, and every data set
is shown apart.

The same windows are judged by scipy's two-sample KS test on the raw values
(p < 0.05, as Evidently does), the textbook chi-square test on the same bins
(p < 0.05) and the fixed cut-offs PSI > 0.2 and JS > 0.1. Rates are per
feature and window, over the features the scenario changes; `open` is the
share of windows with an alert open after persistence (at most 3 in 4 with 4
windows a run: the first window cannot open one), `by 2` the share of runs
whose alert opened within 2 windows, `delay` the median window it opened at.

Goals (exit status 1 when one is missed): no shift: an alert open in <= 1% of
feature-windows (upper end of the 95% interval); a 0.3 sigma mean shift: an
alert within 2 windows in >= 90% of runs; fewer false alarms than PSI > 0.2
and JS > 0.1 while detecting at least as much in every scenario.

    .venv-test/bin/python bench/drift.py [--window 500] [--sequences 10] [--windows 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics as stats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
from scipy.stats import binomtest, chi2_contingency, ks_2samp
from sklearn import datasets
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgefleet.converter.driftcal import (
    calibrate,
    cell_part,
    cumulative_part,
    null_statistics,
    sample_cells,
    statistics,
)
from edgefleet.drift import Histogram, count_into, quantile_edges
from edgefleet.driftstats import (
    FeatureThresholds,
    Persistence,
    js_distance,
    judge_window,
    psi,
)
from edgefleet.tables import format_columns

CALIBRATED_WINDOWS = [100, 500, 2000]
FALSE_ALARM = 0.01
PATCH = 16
POOLED_VALUES = 32
IMAGES = [
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
    "astronaut",
    "coffee",
]
METHODS = ["ours", "KS p<.05", "chi2 p<.05", "PSI>0.2", "JS>0.1"]

Extract = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class Group:
    """One data set: its rows, how rows become feature values, and each feature's reference."""

    name: str
    kind: str  # "tabular" or "image"
    held_out: np.ndarray
    labels: np.ndarray | None
    extract: Extract
    reference_rows: int = 0
    reference_values: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, tuple[Histogram, FeatureThresholds | None]] = field(default_factory=dict)


def split(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit 20%, reference 40%, held-out 40% of the rows, shuffled."""
    order = rng.permutation(rows)
    fit, reference = int(rows * 0.2), int(rows * 0.6)
    return order[:fit], order[fit:reference], order[reference:]


def tabular(name: str, rng: np.random.Generator) -> Group:
    loaded = getattr(datasets, f"load_{name}")()
    rows, targets = np.asarray(loaded.data, dtype=np.float64), np.asarray(loaded.target)
    fit, reference, held_out = split(len(rows), rng)
    columns = [j for j in range(rows.shape[1]) if np.unique(rows[reference, j]).size >= 5]
    classes = name != "diabetes"
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000) if classes else Ridge()
    )
    model.fit(rows[fit], targets[fit])
    fill = rows[fit].mean(axis=0)

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        values = {f"{name}[{j}]": batch[:, j] for j in columns}
        complete = np.where(np.isnan(batch), fill, batch)  # the model sees imputed values
        if classes:
            scores = model.predict_proba(complete)
            values[f"{name}:top1"] = scores.argmax(axis=1).astype(np.float64)
            values[f"{name}:confidence"] = scores.max(axis=1)
        else:
            values[f"{name}:prediction"] = model.predict(complete)
        return values

    group = Group(name, "tabular", rows[held_out], targets[held_out] if classes else None, extract)
    return with_references(group, rows[reference], rng)


def patches(rng: np.random.Generator) -> Group:
    """16x16 patches of scikit-image's bundled pictures, in grey from 0 to 1."""
    from skimage import data

    tiles = []
    for name in IMAGES:
        image = np.asarray(getattr(data, name)(), dtype=np.float64)
        image = image.mean(axis=2) if image.ndim == 3 else image
        image = image / 255.0
        for top in range(0, image.shape[0] - PATCH + 1, PATCH):
            for left in range(0, image.shape[1] - PATCH + 1, PATCH):
                tiles.append(image[top : top + PATCH, left : left + PATCH])
    return image_group("images", np.stack(tiles), None, rng)


def digit_images(rng: np.random.Generator) -> Group:
    """scikit-learn's 8x8 digits as images (grey from 0 to 1)."""
    loaded = datasets.load_digits()
    return image_group("digit images", loaded.images / 16.0, np.asarray(loaded.target), rng)


def image_group(
    name: str, rows: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator
) -> Group:
    """Pooled pixels (POOLED_VALUES per image, as a device subsamples) and per-image summaries."""
    _, reference, held_out = split(len(rows), rng)
    pixels = rows.shape[1] * rows.shape[2]
    positions = rng.choice(pixels, size=min(POOLED_VALUES, pixels), replace=False)

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        flat = batch.reshape(len(batch), -1)
        return {
            f"{name}[c0]": flat[:, positions],
            f"{name}:mean": flat.mean(axis=1),
            f"{name}:std": flat.std(axis=1),
        }

    held_out_labels = None if labels is None else labels[held_out]
    group = Group(name, "image", rows[held_out], held_out_labels, extract)
    return with_references(group, rows[reference], rng)


def with_references(group: Group, reference_rows: np.ndarray, rng: np.random.Generator) -> Group:
    group.reference_rows = len(reference_rows)
    for feature, values in group.extract(reference_rows).items():
        edges = quantile_edges(values)
        per_sample = [np.atleast_1d(row) for row in values]
        thresholds = calibrate(per_sample, edges, CALIBRATED_WINDOWS, [FALSE_ALARM], rng)
        group.reference_values[feature] = values
        group.references[feature] = (count_into(values, edges), thresholds)
    return group


# A shift: (rows, labels, rng) -> rows drawn for one window, already shifted.
Shift = Callable[[Group, int, np.random.Generator], np.ndarray]


def bootstrap(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(group.held_out[rng.integers(0, len(group.held_out), size)])


def mean_shift(sigmas: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = bootstrap(group, size, rng)
        return np.asarray(rows + sigmas * group.held_out.std(axis=0))

    return draw


def scale(factor: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = bootstrap(group, size, rng)
        middle = group.held_out.mean(axis=0)
        return np.asarray(middle + factor * (rows - middle))

    return draw


def reweighted(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0 three times as frequent as in the held-out rows."""
    assert group.labels is not None
    weights = np.where(group.labels == 0, 3.0, 1.0)
    chosen = rng.choice(len(group.held_out), size=size, p=weights / weights.sum())
    return np.asarray(group.held_out[chosen])


def stuck(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Every input stuck at its held-out median (counted per input that this changes)."""
    return np.tile(np.median(group.held_out, axis=0), (size, 1))


def missing(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = bootstrap(group, size, rng)
    return np.where(rng.random(rows.shape) < 0.05, np.nan, rows)


def brightness(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(bootstrap(group, size, rng) + 0.05, 0.0, 1.0)


def noise(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = bootstrap(group, size, rng)
    return np.clip(rows + rng.normal(0.0, 0.05, rows.shape), 0.0, 1.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    shift: Shift
    applies: Callable[[Group], bool]


def everywhere(group: Group) -> bool:
    return True


def tabular_only(group: Group) -> bool:
    return group.kind == "tabular"


SCENARIOS = [
    Scenario("no shift", bootstrap, everywhere),
    *[Scenario(f"mean +{s} sigma", mean_shift(s), everywhere) for s in (0.1, 0.2, 0.3, 0.5)],
    *[Scenario(f"scale x{f}", scale(f), everywhere) for f in (1.1, 1.25, 1.5)],
    Scenario("class 0 x3", reweighted, lambda group: group.labels is not None),
    Scenario("stuck sensor", stuck, tabular_only),
    Scenario("5% missing", missing, tabular_only),
    Scenario("brightness +0.05", brightness, lambda group: group.kind == "image"),
    Scenario("pixel noise 0.05", noise, lambda group: group.kind == "image"),
]


@dataclass
class Tally:
    """Per method, flagged feature-windows; for ours also persistence."""

    windows: int = 0
    flagged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    open_windows: int = 0
    runs: int = 0
    opened_by_two: int = 0
    delays: list[int] = field(default_factory=list)

    def merged(self, other: Tally) -> Tally:
        return Tally(
            windows=self.windows + other.windows,
            flagged={m: self.flagged[m] + other.flagged[m] for m in METHODS},
            open_windows=self.open_windows + other.open_windows,
            runs=self.runs + other.runs,
            opened_by_two=self.opened_by_two + other.opened_by_two,
            delays=self.delays + other.delays,
        )


def changed(scenario: str, feature: str, unshifted: np.ndarray) -> bool:
    """Whether the scenario changes the feature at all (`unshifted`: its held-out values).

    Not: a mean shift of an image's spread; an output or a mostly constant
    input when the inputs are stuck at their median.
    """
    if scenario.startswith("mean") and feature.endswith(":std"):
        return False
    if scenario == "stuck sensor":
        at_median = np.mean(unshifted == np.median(unshifted))
        return ":" not in feature and at_median < 0.5
    return True


def others(
    reference: np.ndarray, window: np.ndarray, ref: Histogram, live: Histogram
) -> dict[str, bool]:
    """The verdicts of the raw-sample tests and the fixed cut-offs on the same window."""
    ks = ks_2samp(reference[np.isfinite(reference)], window[np.isfinite(window)]).pvalue
    table = np.array([cells(ref), cells(live)])
    table = table[:, table.sum(axis=0) > 0]
    chi2 = table.shape[1] > 1 and chi2_contingency(table).pvalue < 0.05
    return {
        "KS p<.05": bool(ks < 0.05),
        "chi2 p<.05": bool(chi2),
        "PSI>0.2": psi(ref, live) > 0.2,
        "JS>0.1": js_distance(ref, live) > 0.1,
    }


def cells(histogram: Histogram) -> list[int]:
    ordered = list(histogram.counts)
    ordered[0] += histogram.below
    ordered[-1] += histogram.above
    return [*ordered, histogram.nan]


def run_group(
    scenario: Scenario, group: Group, args: argparse.Namespace, rng: np.random.Generator
) -> Tally:
    tally = Tally()
    unshifted = group.extract(group.held_out)
    judged = [f for f in group.references if changed(scenario.name, f, unshifted[f])]
    runs = args.sequences * (3 if scenario.name == "no shift" else 1)
    for _ in range(runs):
        persistence = {feature: Persistence() for feature in judged}
        opened_at: dict[str, int] = {}
        for index in range(1, args.windows + 1):
            values = group.extract(scenario.shift(group, args.window, rng))
            live = {
                feature: count_into(values[feature], reference.edges)
                for feature, (reference, _) in group.references.items()
            }
            for verdict in judge_window(group.references, live).features:
                feature = verdict.feature
                if feature not in persistence:
                    continue
                drifted = verdict.status == "drift"
                transition = persistence[feature].update(drifted)
                if transition == "open":
                    opened_at.setdefault(feature, index)
                tally.windows += 1
                tally.flagged["ours"] += drifted
                tally.open_windows += transition in ("open", "still-open")
                reference_counts = group.references[feature][0]
                found = others(
                    group.reference_values[feature].reshape(-1),
                    values[feature].reshape(-1),
                    reference_counts,
                    live[feature],
                )
                for method, flagged in found.items():
                    tally.flagged[method] += flagged
        tally.runs += len(judged)
        tally.opened_by_two += sum(1 for delay in opened_at.values() if delay <= 2)
        tally.delays += list(opened_at.values())
    return tally


VARIANTS = {
    "the statistic": statistics,
    "its cumulative part": cumulative_part,
    "its cell part": cell_part,
}
COMPARED = [
    "no shift",
    "mean +0.2 sigma",
    "scale x1.25",
    "class 0 x3",
    "5% missing",
    "brightness +0.05",
    "pixel noise 0.05",
]
COMPARE_DRAWS = 2000
COMPARE_WINDOWS = 20


def every_variant(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    return np.stack([variant(reference, live) for variant in VARIANTS.values()], axis=1)


def compare_statistics(
    groups: list[Group], args: argparse.Namespace, rng: np.random.Generator
) -> list[list[object]]:
    """Per scenario, the share of feature-windows each variant flags at its own 1% threshold."""
    cuts, totals = {}, {}
    for group in groups:
        for feature, (reference, _) in group.references.items():
            values = [np.atleast_1d(row) for row in group.reference_values[feature]]
            per_sample = sample_cells(values, reference.edges)
            null = null_statistics(per_sample, [args.window], COMPARE_DRAWS, rng, every_variant)
            cuts[feature] = np.quantile(null[args.window], 1 - FALSE_ALARM, axis=0)
            totals[feature] = per_sample.sum(axis=0)[None]
    table: list[list[object]] = [["scenario", "feature-windows", *(f"{v} %" for v in VARIANTS)]]
    for scenario in (s for s in SCENARIOS if s.name in COMPARED):
        flagged, windows = np.zeros(len(VARIANTS)), 0
        for group in (g for g in groups if scenario.applies(g)):
            unshifted = group.extract(group.held_out)
            judged = [f for f in group.references if changed(scenario.name, f, unshifted[f])]
            for _ in range(COMPARE_WINDOWS):
                values = group.extract(scenario.shift(group, args.window, rng))
                for feature in judged:
                    live = count_into(values[feature], group.references[feature][0].edges)
                    found = every_variant(totals[feature], np.array([cells(live)]))[0]
                    flagged += found > cuts[feature]
                    windows += 1
        table.append([scenario.name, windows, *(percent(int(f), windows) for f in flagged)])
    return table


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=500, help="samples per window")
    parser.add_argument("--sequences", type=int, default=10, help="runs per scenario, x3 unshifted")
    parser.add_argument("--windows", type=int, default=4, help="windows per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    groups = [
        tabular(name, rng) for name in ("breast_cancer", "wine", "digits", "diabetes", "iris")
    ]
    groups += [digit_images(rng), patches(rng)]
    calibrated = time.monotonic() - started
    print(
        f"{sum(len(g.references) for g in groups)} features in {len(groups)} data sets, "
        f"calibrated in {calibrated:.0f} s. Windows of {args.window} samples are drawn WITH "
        f"REPLACEMENT from the held-out rows (bootstrap: the bundled data sets are small), "
        f"{args.sequences} runs of {args.windows} windows per scenario and data set "
        f"({3 * args.sequences} without shift)."
    )
    results = {
        scenario.name: {
            group.name: run_group(scenario, group, args, rng)
            for group in groups
            if scenario.applies(group)
        }
        for scenario in SCENARIOS
    }
    fresh = {group.name for group in groups if len(group.held_out) >= args.window}
    totals = {
        name: reduce(Tally.merged, [t for g, t in by_group.items() if g in fresh], Tally())
        for name, by_group in results.items()
    }
    print(
        f"\nData sets with at least as many held-out rows as a window has samples "
        f"({', '.join(sorted(fresh))}): the goals are judged on these."
    )
    print(
        format_columns(
            [["scenario", *HEADER[1:]], *(row(n, t) for n, t in totals.items())], rule=True
        )
    )

    print(
        "\nPer data set (reference rows / held-out rows). Where the held-out rows are fewer than "
        "a window's samples, a window repeats rows and carries the held-out rows' own sampling "
        "difference from the reference as if it were a shift: false alarms there measure the "
        "bench, not the field."
    )
    table: list[list[object]] = [["data set / scenario", *HEADER[1:]]]
    for group in groups:
        label = f"{group.name} ({group.reference_rows}/{len(group.held_out)})"
        for name in ("no shift", "mean +0.3 sigma"):
            if group.name in results[name]:
                table.append(row(f"{label} {name}", results[name][group.name]))
    print(format_columns(table, rule=True))

    print(
        f"\nThe statistic against each of its parts alone, each calibrated the same way "
        f"(1% of windows of {args.window} samples per feature, no sharing among features), "
        f"{COMPARE_WINDOWS} windows per scenario and data set, same data sets:"
    )
    chosen = [group for group in groups if group.name in fresh]
    print(format_columns(compare_statistics(chosen, args, rng), rule=True))

    calm = totals["no shift"]
    interval = binomtest(calm.open_windows, calm.windows).proportion_ci(0.95)
    print(
        f"\nno shift, after persistence: alert open in {percent(calm.open_windows, calm.windows)}% "
        f"of feature-windows (95% interval {100 * interval.low:.2f}..{100 * interval.high:.2f}%); "
        f"in one window: {percent(calm.flagged['ours'], calm.windows)}%"
    )
    print(f"total {time.monotonic() - started:.0f} s")
    return 0 if goals_met(totals, interval.high) else 1


def goals_met(totals: dict[str, Tally], calm_upper: float) -> bool:
    calm, shift = totals["no shift"], totals["mean +0.3 sigma"]
    checks = {
        "no shift: alert open in <= 1% of feature-windows (95% upper bound)": calm_upper <= 0.01,
        "mean +0.3 sigma: alert within 2 windows in >= 90% of runs": shift.opened_by_two
        >= 0.9 * shift.runs,
    }
    for fixed in ("PSI>0.2", "JS>0.1"):
        weaker = [
            name
            for name, tally in totals.items()
            if name != "no shift" and tally.flagged["ours"] < tally.flagged[fixed]
        ]
        fewer = calm.flagged["ours"] < calm.flagged[fixed]
        checks[
            f"fewer false alarms than {fixed} in one window "
            f"({percent(calm.flagged['ours'], calm.windows)}% against "
            f"{percent(calm.flagged[fixed], calm.windows)}%) and detects as much "
            f"(less in: {', '.join(weaker) if weaker else 'none'})"
        ] = fewer and not weaker
    for goal, met in checks.items():
        print(f"{'met   ' if met else 'MISSED'} {goal}")
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main())
