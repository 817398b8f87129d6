"""Benchmark: drift verdicts from bin counts, against raw-sample tests and fixed cut-offs.

Data that packages ship, nothing downloaded: scikit-learn's bundled data sets
(breast_cancer, wine, digits, diabetes, iris; digits also as 8x8 images),
16x16 patches of scikit-image's bundled pictures (IMAGES) and statsmodels'
bundled survey data sets randhie (20,190 rows) and fair (6,366 rows; `survey`
says what they are). Each is split into fit (a model is trained on it:
logistic regression for classes, ridge for diabetes and randhie), reference
and held-out rows (20/40/40%, fit and reference at most 2,000 rows each, the
rest held out). Features: every column with at least 5
distinct values and the model's outputs (top-1 class and confidence, or the
prediction); for images the pooled pixels (32 per image, as a device subsamples
a large tensor) and each image's mean and standard deviation.

Through the real code: bins from `edgefleet.drift.reference_edges` on the
reference, thresholds from `edgefleet.converter.driftcal.calibrate` (false
alarm 1% per window, at the converter's window sizes: 50 to 5000 samples),
windows counted with `count_into` and judged with `edgefleet.driftstats.judge_window` (the 1% shared
among each data set's features) and `Persistence` (2 windows).

Windows of --window samples are drawn from the held-out rows WITHOUT
replacement: such a window is itself an i.i.d. sample of the population, as a
device's window is (drawn with replacement, it would also carry the held-out
rows' own chance difference from the population). --sequences runs of
--windows windows per scenario and data set (three times as many without
shift); a shift is applied to the drawn rows before the model and the counts.
Where the held-out rows are fewer than a window's samples, they are drawn with
replacement, and the windows carry the held-out rows' chance difference as if
it were a shift: the goals are judged on the data sets with enough held-out
rows, and every data set is shown apart. Windows drawn from the same held-out
rows overlap, so they are correlated, and their number does not make the
calm rate more precise.

The calm rate's interval is measured apart (`calm_population`), on a
population: each data set's rows that trained no model (reference and
held-out rows). --calm-references references, each drawn with replacement
from the population, as many rows as the data set's reference, calibrated as
the reference is; against each, at 100, 200, 500 samples and the sizes asked
for, --calm-windows windows drawn with replacement from the population, in a
row through each feature's persistence. Why this is sound: the reference and
every window are i.i.d. samples of one distribution (the population's rows),
which is exactly what the calibration promises its rate for; given the
reference, the windows are independent trials, as many as time allows. What
it costs: the rate is that of this discrete distribution (rows repeat), not of
the world the rows came from; the windows of one reference share it, and the
rate differs from one reference to another (each reference's drifted counts
are shown); the features of a window share its rows.

The same windows are judged by scipy's two-sample KS test on the raw values
(p < 0.05, as Evidently does), the textbook chi-square test on the same bins
(p < 0.05) and the fixed cut-offs PSI > 0.2 and JS > 0.1. Rates are per
feature and window, over the features the scenario changes; `open` is the
share of windows with an alert open after persistence (at most 3 in 4 with 4
windows a run: the first window cannot open one), `by 2` the share of runs
whose alert opened within 2 windows, `delay` the median window it opened at.

Goals (exit status 1 when one is missed): no shift: an alert open in <= 1% of
the feature-windows drawn from the populations, every feature together, at
each calm size (the upper end of the 95% interval, `Calm.open_bound`); a 0.3
sigma mean shift: an alert within 2 windows in >= 90% of runs; fewer false alarms than
PSI > 0.2 and JS > 0.1 at equal or better detection, in every shift scenario
and both ways: with our cut moved until we detect as much as the cut-off, we
flag no more calm feature-windows than it does; with our cut moved until we
flag as many calm feature-windows as it does, we detect as much (per feature
and window, before persistence; the calm feature-windows are those drawn from
the populations of the data sets the goals are judged on, judged by ours and
the cut-offs alike). --window-sizes judges this goal also at other window
sizes, on the same data sets (those with --window held-out rows). Beside the
goals, the same test with the calm alarms spent feature by feature
(`per_feature`): ours moved on each feature to the cut-off's calm rate there.

    .venv-test/bin/python bench/drift.py [--window 500] [--sequences 10] [--windows 4] [--seed 0]
        [--window-sizes 100,200,1000] [--calm-references 10] [--calm-windows 100]
"""

from __future__ import annotations

import argparse
import importlib
import statistics as stats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
from scipy.stats import beta, chi2_contingency, ks_2samp
from sklearn import datasets
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgefleet.converter.driftcal import both_parts, calibrate, null_statistics, sample_cells
from edgefleet.converter.reference import WINDOW_SIZES
from edgefleet.drift import Histogram, count_into, reference_edges
from edgefleet.driftstats import (
    PSEUDO_COUNT,
    FeatureThresholds,
    FeatureVerdict,
    Persistence,
    judge_window,
    threshold_at,
)
from edgefleet.tables import format_columns

FALSE_ALARM = 0.01
MOST_ROWS = 2000
CALM_SIZES = (100, 200, 500)  # the calm rate is measured at these and --window, --window-sizes
CALM_REFERENCES = 10  # per data set, drawn from its population (--calm-references)
CALM_WINDOWS = 100  # per reference and window size (--calm-windows)
# statsmodels' bundled data sets: the column the model predicts, and whether as classes.
STATSMODELS_SETS = {"randhie": ("mdvis", False), "fair": ("affairs", True)}
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
    "chelsea",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
]
METHODS = ["ours", "KS p<.05", "chi2 p<.05", "PSI>0.2", "JS>0.1"]
FIXED_CUTOFFS = {"PSI>0.2": ("PSI", 0.2), "JS>0.1": ("JS", 0.1)}

Extract = Callable[[np.ndarray], dict[str, np.ndarray]]
# Per feature, its reference: the bins' counts and the calibrated thresholds.
References = dict[str, tuple[Histogram, FeatureThresholds | None]]


@dataclass
class Group:
    """One data set: its rows, how rows become feature values, and each feature's reference."""

    name: str
    kind: str  # "tabular" or "image"
    held_out: np.ndarray
    labels: np.ndarray | None
    extract: Extract
    population: np.ndarray  # the rows that trained no model: reference and held-out rows
    reference_rows: int = 0
    reference_values: dict[str, np.ndarray] = field(default_factory=dict)
    references: References = field(default_factory=dict)


def split(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit 20%, reference 40%, held-out the rest of the rows, shuffled.

    Fit and reference take at most MOST_ROWS rows each (a converter's
    calibration and validation data), so that large data sets hold out more.
    """
    order = rng.permutation(rows)
    fit = min(int(rows * 0.2), MOST_ROWS)
    reference = fit + min(int(rows * 0.6) - int(rows * 0.2), MOST_ROWS)
    return order[:fit], order[fit:reference], order[reference:]


def scikit_learn(name: str, rng: np.random.Generator) -> Group:
    """One of scikit-learn's bundled data sets (diabetes a regression, the others classes)."""
    loaded = getattr(datasets, f"load_{name}")()
    rows, targets = np.asarray(loaded.data, dtype=np.float64), np.asarray(loaded.target)
    return tabular(name, rows, targets, name != "diabetes", rng)


def survey(name: str, rng: np.random.Generator) -> Group:
    """One of statsmodels' bundled survey data sets (STATSMODELS_SETS), offline.

    randhie: 20,190 person-years of the RAND Health Insurance Experiment, the
    number of doctor visits predicted (a regression); people were followed for
    up to five years, so one person's rows can fall in both the reference and
    the held-out rows. fair: 6,366 answers to a 1974 magazine survey, whether
    the woman had an affair (classes); its own count of affairs is left out of
    the inputs, as it gives the answer away.
    """
    target, classes = STATSMODELS_SETS[name]
    frame = importlib.import_module(f"statsmodels.datasets.{name}").load_pandas().data
    targets = np.asarray(frame[target], dtype=np.float64)
    rows = np.asarray(frame.drop(columns=[target]), dtype=np.float64)
    return tabular(name, rows, (targets > 0).astype(int) if classes else targets, classes, rng)


def tabular(
    name: str, rows: np.ndarray, targets: np.ndarray, classes: bool, rng: np.random.Generator
) -> Group:
    fit, reference, held_out = split(len(rows), rng)
    columns = [j for j in range(rows.shape[1]) if np.unique(rows[reference, j]).size >= 5]
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

    group = Group(
        name,
        "tabular",
        rows[held_out],
        targets[held_out] if classes else None,
        extract,
        rows[np.concatenate([reference, held_out])],
    )
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
    population = rows[np.concatenate([reference, held_out])]
    group = Group(name, "image", rows[held_out], held_out_labels, extract, population)
    return with_references(group, rows[reference], rng)


def calibrated(
    extract: Extract, reference_rows: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], References]:
    """Each feature's values on the reference rows, and its reference: bins' counts, thresholds.

    As a converter does: bins from the reference's values, thresholds
    calibrated at its window sizes.
    """
    values = extract(reference_rows)
    references: References = {}
    for feature, feature_values in values.items():
        edges = reference_edges(feature_values)
        per_sample = [np.atleast_1d(row) for row in feature_values]
        thresholds = calibrate(per_sample, edges, WINDOW_SIZES, [FALSE_ALARM], rng)
        references[feature] = (count_into(feature_values, edges), thresholds)
    return values, references


def with_references(group: Group, reference_rows: np.ndarray, rng: np.random.Generator) -> Group:
    group.reference_rows = len(reference_rows)
    group.reference_values, group.references = calibrated(group.extract, reference_rows, rng)
    return group


# A shift: (rows, labels, rng) -> rows drawn for one window, already shifted.
Shift = Callable[[Group, int, np.random.Generator], np.ndarray]


def window_rows(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """A window's rows: without replacement when the held-out rows suffice, else with.

    Rows drawn without replacement from i.i.d. held-out rows are themselves an
    i.i.d. sample of the population, as a device's window is. Drawn with
    replacement, a window differs from the population by the held-out rows'
    own chance difference on top of its own: noisier than a real window.
    """
    held_out = len(group.held_out)
    return np.asarray(group.held_out[rng.choice(held_out, size, replace=size > held_out)])


def mean_shift(sigmas: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = window_rows(group, size, rng)
        return np.asarray(rows + sigmas * group.held_out.std(axis=0))

    return draw


def scale(factor: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = window_rows(group, size, rng)
        middle = group.held_out.mean(axis=0)
        return np.asarray(middle + factor * (rows - middle))

    return draw


def reweighted(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0 three times as frequent as in the held-out rows.

    The window's class 0 rows and other rows are each drawn as `window_rows`
    draws: class 0's rows repeat where the held-out rows hold fewer than the
    window needs.
    """
    assert group.labels is not None
    class_0 = np.flatnonzero(group.labels == 0)
    rest = np.flatnonzero(group.labels != 0)
    share = 3 * len(class_0) / (3 * len(class_0) + len(rest))
    count = int(rng.binomial(size, share))
    chosen = [
        indices[rng.choice(len(indices), wanted, replace=wanted > len(indices))]
        for indices, wanted in ((class_0, count), (rest, size - count))
    ]
    return np.asarray(group.held_out[rng.permutation(np.concatenate(chosen))])


def stuck(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Every input stuck at its held-out median (counted per input that this changes)."""
    return np.tile(np.median(group.held_out, axis=0), (size, 1))


def missing(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = window_rows(group, size, rng)
    return np.where(rng.random(rows.shape) < 0.05, np.nan, rows)


def brightness(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(window_rows(group, size, rng) + 0.05, 0.0, 1.0)


def noise(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = window_rows(group, size, rng)
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
    Scenario("no shift", window_rows, everywhere),
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
    # Per feature-window, what each method flags above a cut: ours (`surprise`), PSI, JS.
    scores: dict[str, list[float]] = field(
        default_factory=lambda: {"ours": [], "PSI": [], "JS": []}
    )
    where: list[str] = field(default_factory=list)  # per feature-window: data set and kind
    features: list[str] = field(default_factory=list)  # per feature-window: the feature

    def merged(self, other: Tally) -> Tally:
        return Tally(
            windows=self.windows + other.windows,
            flagged={m: self.flagged[m] + other.flagged[m] for m in METHODS},
            open_windows=self.open_windows + other.open_windows,
            runs=self.runs + other.runs,
            opened_by_two=self.opened_by_two + other.opened_by_two,
            delays=self.delays + other.delays,
            scores={k: self.scores[k] + other.scores[k] for k in self.scores},
            where=self.where + other.where,
            features=self.features + other.features,
        )


def surprise(thresholds: FeatureThresholds | None, verdict: FeatureVerdict) -> float:
    """How far a feature-window lies beyond what the feature's verdict flags, in tail scales.

    Our verdict with its false-alarm rate moved from the calibrated a to a * exp(-x)
    flags exactly the windows whose surprise exceeds x: the statistic along the
    fitted tail, at the rate left by the outside test's share, or the outside
    test's chance within its share.
    """
    threshold = None if thresholds is None else threshold_at(thresholds, verdict.samples)
    if thresholds is None or threshold is None:
        return -np.inf
    share = thresholds.outside_share or 0.0
    farther = threshold_at(thresholds, verdict.samples, thresholds.false_alarm / np.e)
    assert farther is not None
    if farther == threshold:  # no tail: nothing beyond the threshold was ever drawn
        by_statistic = np.inf if verdict.statistic > threshold else -np.inf
    else:
        by_statistic = (verdict.statistic - threshold) / (farther - threshold) + np.log(1 - share)
    if verdict.outside is None:
        return float(by_statistic)
    chance = verdict.outside.chance
    by_outside = np.log(thresholds.false_alarm * share / chance) if chance > 0 else np.inf
    return float(max(by_statistic, by_outside))


def cut_for(calm: list[float], allowed: int) -> float:
    """The cut above which at most `allowed` of the calm scores lie (ties stay below)."""
    ordered = np.sort(np.asarray(calm))[::-1]
    return float(ordered[min(allowed, len(ordered) - 1)])


def cut_detecting(scores: list[float], wanted: int) -> float:
    """The largest cut above which at least `wanted` of the scores lie."""
    if wanted == 0:
        return float(np.inf)
    ordered = np.sort(np.asarray(scores))[::-1]
    return float(np.nextafter(ordered[wanted - 1], -np.inf))


def above(scores: list[float], cut: float) -> int:
    return int(np.count_nonzero(np.asarray(scores) > cut))


def matched(
    totals: dict[str, Tally], calm: Tally
) -> tuple[list[list[object]], dict[str, list[str]]]:
    """The goal's test against each fixed cut-off, per shift scenario, both ways.

    The calm side is `calm`: the windows drawn from the populations, judged by
    ours and the cut-offs alike (independent trials given their reference, not
    the overlapping no-shift windows of the scenario runs). At the cut-off's
    detection: our cut (the rate moved along the fitted tail, no sharing among
    features) moved until we detect as many of the scenario's feature-windows
    as the cut-off does; are our calm feature-windows flagged as rarely as the
    cut-off's? At the cut-off's false-alarm rate: our cut moved until we flag
    as many calm feature-windows; do we detect as much? Also shown: the
    cut-off moved to our verdict's calm rate. Returns the table and, per fixed
    cut-off, the shift scenarios where either way fails.
    """
    table: list[list[object]] = [["scenario", "ours %"]]
    cuts = {}
    for method, (score_name, _) in FIXED_CUTOFFS.items():
        table[0] += [
            f"{method} %",
            "ours at its calm rate %",
            "our calm rate at its detection %",
            f"{score_name} at our calm rate %",
        ]
        cuts[method] = (
            cut_for(calm.scores["ours"], calm.flagged[method]),
            cut_for(calm.scores[score_name], calm.flagged["ours"]),
        )
    weaker: dict[str, list[str]] = {method: [] for method in FIXED_CUTOFFS}
    shifted = {name: tally for name, tally in totals.items() if name != "no shift"}
    for name, tally in {"no shift (population)": calm, **shifted}.items():
        line: list[object] = [name, percent(tally.flagged["ours"], tally.windows, 2)]
        for method, (score_name, _) in FIXED_CUTOFFS.items():
            ours_cut, their_cut = cuts[method]
            ours_there = above(tally.scores["ours"], ours_cut)
            calm_at_detection = above(
                calm.scores["ours"], cut_detecting(tally.scores["ours"], tally.flagged[method])
            )
            line += [
                percent(tally.flagged[method], tally.windows, 2),
                percent(ours_there, tally.windows, 2),
                "-" if tally is calm else percent(calm_at_detection, calm.windows, 2),
                percent(above(tally.scores[score_name], their_cut), tally.windows, 2),
            ]
            less = ours_there < tally.flagged[method] or calm_at_detection > calm.flagged[method]
            if tally is not calm and less:
                weaker[method].append(name)
        table.append(line)
    return table, weaker


def print_shortfall(totals: dict[str, Tally], calm: Tally) -> None:
    """Where ours falls short of a fixed cut-off: per scenario, data set and feature kind.

    Ours with its cut moved to the cut-off's calm rate (as in `matched`): the
    feature-windows the cut-off flags and ours does not, and the other way
    round; and the calm feature-windows of the same data set and kind that
    each flags (ours with its cut moved until it detects as much as the
    cut-off in the whole scenario).
    """
    table: list[list[object]] = [
        [
            "cut-off",
            "scenario",
            "data set: kind",
            "windows",
            "it only",
            "ours only",
            "calm: it",
            "calm: ours at its detection",
        ]
    ]
    for method, (score_name, limit) in FIXED_CUTOFFS.items():
        ours_cut = cut_for(calm.scores["ours"], calm.flagged[method])
        for name in matched(totals, calm)[1][method]:
            tally = totals[name]
            detecting = cut_detecting(tally.scores["ours"], tally.flagged[method])
            for where in sorted(set(tally.where)):
                mine = [i for i, w in enumerate(tally.where) if w == where]
                calm_mine = [i for i, w in enumerate(calm.where) if w == where]
                theirs = {i for i in mine if tally.scores[score_name][i] > limit}
                ours = {i for i in mine if tally.scores["ours"][i] > ours_cut}
                calm_theirs = sum(calm.scores[score_name][i] > limit for i in calm_mine)
                calm_ours = sum(calm.scores["ours"][i] > detecting for i in calm_mine)
                if theirs != ours or calm_theirs != calm_ours:
                    table.append(
                        [
                            method,
                            name,
                            where,
                            len(mine),
                            len(theirs - ours),
                            len(ours - theirs),
                            calm_theirs,
                            calm_ours,
                        ]
                    )
    if len(table) > 1:
        print("Where ours falls short, per data set and feature kind (feature-windows):")
        print(format_columns(table, rule=True))


RESOLVED = 10  # calm windows a cut-off must flag on a feature for its rate there to count


def per_feature(
    totals: dict[str, Tally], calm: Tally
) -> tuple[list[list[object]], dict[str, list[str]]]:
    """The goal's test against each fixed cut-off with the calm alarms spent feature by feature.

    As `matched`, but ours is moved on each feature apart: to the calm rate
    the cut-off shows on that feature (in `calm`), and to the detection the
    cut-off shows on that feature in the scenario; the features' counts are
    then added. This sets the two tests side by side at the same false-alarm
    rate per feature (a test's power at equal size), where `matched` lets the
    cut-off's calm alarms fall on the features it happens to favour. A rate
    is only known on a feature where the cut-off flags at least RESOLVED of
    its calm windows: "none of 1,000" does not say how rare. The features
    where it flags fewer are taken together, as `matched` takes them all.
    """
    table: list[list[object]] = [["scenario"]]
    for method in FIXED_CUTOFFS:
        table[0] += [
            f"{method} %",
            "ours at its calm rates %",
            f"{method} calm %",
            "our calm at its detections %",
        ]
    weaker: dict[str, list[str]] = {method: [] for method in FIXED_CUTOFFS}
    rows = {name: [name] for name in totals if name != "no shift"}
    for method, (score_name, limit) in FIXED_CUTOFFS.items():
        calm_parts = _parts(calm, score_name, limit)
        for name, line in rows.items():
            tally = totals[name]
            theirs = ours = their_calm = our_calm = calm_windows = 0
            shifted_parts = _parts(tally, score_name, limit, resolved=set(calm_parts) - {""})
            for part, shifted in shifted_parts.items():
                quiet = calm_parts.get(part, [])
                quiet_ours = [calm.scores["ours"][i] for i in quiet]
                quiet_flagged = sum(calm.scores[score_name][i] > limit for i in quiet)
                detected = sum(tally.scores[score_name][i] > limit for i in shifted)
                shifted_ours = [tally.scores["ours"][i] for i in shifted]
                ours_cut = (
                    -np.inf if quiet_flagged >= len(quiet) else cut_for(quiet_ours, quiet_flagged)
                )
                theirs += detected
                ours += above(shifted_ours, ours_cut)
                their_calm += quiet_flagged
                our_calm += above(quiet_ours, cut_detecting(shifted_ours, detected))
                calm_windows += len(quiet)
            line += [
                percent(theirs, tally.windows, 2),
                percent(ours, tally.windows, 2),
                percent(their_calm, calm_windows, 2),
                percent(our_calm, calm_windows, 2),
            ]
            if ours < theirs or our_calm > their_calm:
                weaker[method].append(name)
    table += rows.values()
    return table, weaker


def _parts(
    tally: Tally, score_name: str, limit: float, resolved: set[str] | None = None
) -> dict[str, list[int]]:
    """The positions of `tally`'s feature-windows per feature whose rate is known, the rest as "".

    Known (with `resolved` None, on calm windows): the cut-off flags at least
    RESOLVED of the feature's windows; else the features named in `resolved`.
    """
    positions: dict[str, list[int]] = {}
    for index, feature in enumerate(tally.features):
        positions.setdefault(feature, []).append(index)
    if resolved is None:
        resolved = {
            feature
            for feature, indices in positions.items()
            if sum(tally.scores[score_name][i] > limit for i in indices) >= RESOLVED
        }
    parts: dict[str, list[int]] = {}
    for feature, indices in positions.items():
        parts.setdefault(feature if feature in resolved else "", []).extend(indices)
    return parts


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


def raw_tests(
    reference: np.ndarray, window: np.ndarray, ref: Histogram, live: Histogram
) -> dict[str, bool]:
    """The verdicts of the raw-sample tests on the same window: KS, chi-square on the cells."""
    ks = ks_2samp(reference[np.isfinite(reference)], window[np.isfinite(window)]).pvalue
    table = np.array([cells_apart(ref), cells_apart(live)])
    table = table[:, table.sum(axis=0) > 0]
    chi2 = table.shape[1] > 1 and chi2_contingency(table).pvalue < 0.05
    return {"KS p<.05": bool(ks < 0.05), "chi2 p<.05": bool(chi2)}


def score(tally: Tally, thresholds: FeatureThresholds | None, verdict: FeatureVerdict) -> None:
    """Count one feature-window: our verdict, the fixed cut-offs' and the scores behind them."""
    tally.windows += 1
    tally.features.append(verdict.feature)
    tally.flagged["ours"] += verdict.status == "drift"
    tally.scores["ours"].append(surprise(thresholds, verdict))
    for method, (name, limit) in FIXED_CUTOFFS.items():
        value = verdict.psi if name == "PSI" else verdict.js
        tally.flagged[method] += value > limit
        tally.scores[name].append(value)


def cells(histogram: Histogram) -> list[int]:
    """The statistic's cells: values outside the range folded into the outer bins, NaN last."""
    ordered = list(histogram.counts)
    ordered[0] += histogram.below
    ordered[-1] += histogram.above
    return [*ordered, histogram.nan]


def cells_apart(histogram: Histogram) -> list[int]:
    """The cells of PSI and JS: values below and above the range apart, NaN last."""
    return [histogram.below, *histogram.counts, histogram.above, histogram.nan]


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
                tally.open_windows += transition in ("open", "still-open")
                reference_counts, thresholds = group.references[feature]
                found = raw_tests(
                    group.reference_values[feature].reshape(-1),
                    values[feature].reshape(-1),
                    reference_counts,
                    live[feature],
                )
                for method, flagged in found.items():
                    tally.flagged[method] += flagged
                score(tally, thresholds, verdict)
                tally.where.append(f"{group.name}: {feature_kind(group, feature)}")
        tally.runs += len(judged)
        tally.opened_by_two += sum(1 for delay in opened_at.values() if delay <= 2)
        tally.delays += list(opened_at.values())
    return tally


VARIANTS = [
    "the plain sum (before)",
    "its cumulative part",
    "its cell part",
    "the larger part, scaled",
    "the statistic (the sum, scaled)",
    "with a spread part, scaled",
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


def compared_parts(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Per row of cell counts: the statistic's two parts, a candidate spread part, JS."""
    return np.column_stack(
        [both_parts(reference, live), spread_part(reference, live), js_distances(reference, live)]
    )


def every_variant(parts: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per row of `compared_parts`, each variant's value (`scales`: each one's null quantile)."""
    scaled = parts / np.maximum(scales, 1e-12)
    two, plain = scaled[:, :2], parts[:, :2]
    with_spread = scaled[:, :3].sum(axis=1)
    return np.stack(
        [plain.sum(axis=1), *plain.T, two.max(axis=1), two.sum(axis=1), with_spread, parts[:, 3]],
        axis=1,
    )


def compare_statistics(
    groups: list[Group], args: argparse.Namespace, rng: np.random.Generator
) -> list[list[object]]:
    """Per scenario, the share of feature-windows each variant flags at its own 1% threshold."""
    cuts, scales, totals = {}, {}, {}
    for group in groups:
        for feature, (reference, _) in group.references.items():
            samples = [np.atleast_1d(row) for row in group.reference_values[feature]]
            per_sample = sample_cells(samples, reference.edges)
            null = null_statistics(per_sample, [args.window], COMPARE_DRAWS, rng, compared_parts)
            scales[feature] = np.quantile(null[args.window], 1 - FALSE_ALARM, axis=0)
            variants = every_variant(null[args.window], scales[feature])
            cuts[feature] = np.quantile(variants, 1 - FALSE_ALARM, axis=0)
            totals[feature] = per_sample.sum(axis=0)[None]
    table: list[list[object]] = [["scenario", "feature-windows", *(f"{v} %" for v in VARIANTS)]]
    for scenario in SCENARIOS:
        flagged, windows = np.zeros(len(VARIANTS)), 0
        for group in (g for g in groups if scenario.applies(g)):
            unshifted = group.extract(group.held_out)
            judged = [f for f in group.references if changed(scenario.name, f, unshifted[f])]
            for _ in range(COMPARE_WINDOWS):
                values = group.extract(scenario.shift(group, args.window, rng))
                for feature in judged:
                    live = count_into(values[feature], group.references[feature][0].edges)
                    parts = compared_parts(totals[feature], np.array([cells(live)]))
                    found = every_variant(parts, scales[feature])[0]
                    flagged += found > cuts[feature]
                    windows += 1
        table.append([scenario.name, windows, *(percent(int(f), windows) for f in flagged)])
    return table


def percent(part: int, whole: int, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}" if whole else "-"


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


def at_least_one(text: str) -> int:
    """A count of at least 1."""
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


def window_sizes(text: str) -> list[int]:
    """Comma-separated window sizes, each at least 1 sample."""
    sizes = [int(size) for size in text.split(",")]
    if min(sizes) < 1:
        raise ValueError(text)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=500, help="samples per window")
    parser.add_argument("--sequences", type=int, default=10, help="runs per scenario, x3 unshifted")
    parser.add_argument("--windows", type=int, default=4, help="windows per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window-sizes",
        type=window_sizes,
        default=[],
        help="also judge the goal against the fixed cut-offs at these sizes, e.g. 100,200,1000",
    )
    parser.add_argument(
        "--calm-references",
        type=at_least_one,
        default=CALM_REFERENCES,
        help="references drawn from each data set's population for the calm rate",
    )
    parser.add_argument(
        "--calm-windows",
        type=at_least_one,
        default=CALM_WINDOWS,
        help="calm windows in a row per reference and window size",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    groups = [
        scikit_learn(name, rng) for name in ("breast_cancer", "wine", "digits", "diabetes", "iris")
    ]
    groups += [digit_images(rng), patches(rng), *(survey(name, rng) for name in STATSMODELS_SETS)]
    calibrated = time.monotonic() - started
    print(
        f"{sum(len(g.references) for g in groups)} features in {len(groups)} data sets, "
        f"calibrated in {calibrated:.0f} s. Windows of {args.window} samples are drawn WITHOUT "
        f"replacement from the held-out rows (with replacement where they are fewer), "
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
        f"\nThe statistic (the sum of its parts, each scaled by its own 1% quantile without "
        f"drift) against the plain sum, each part alone, the larger scaled part, the sum with a "
        f"third, spread part and the Jensen-Shannon distance, each calibrated the same way "
        f"(1% of windows of {args.window} samples per feature, no sharing among features), "
        f"{COMPARE_WINDOWS} windows per scenario and data set, same data sets:"
    )
    chosen = [group for group in groups if group.name in fresh]
    print(format_columns(compare_statistics(chosen, args, rng), rule=True))

    by_size = {args.window: totals}
    for size in (size for size in args.window_sizes if size != args.window):
        by_size[size] = totals_at(size, chosen, args, rng)

    calm = totals["no shift"]
    calm_sizes = sorted({*CALM_SIZES, args.window, *args.window_sizes})
    print(
        f"\nno shift, overlapping windows as above: alert open in "
        f"{percent(calm.open_windows, calm.windows)}% of {calm.windows} feature-windows, in one "
        f"window {percent(calm.flagged['ours'], calm.windows)}%. Drawn from each data set's "
        f"population (its reference and held-out rows), with replacement: "
        f"{args.calm_references} references of the data set's reference size, each calibrated, "
        f"and against each {args.calm_windows} windows in a row per size, at "
        f"{', '.join(map(str, calm_sizes))} samples, every data set (the windows independent "
        f"trials given their reference; the features of a window counted as independent):"
    )
    calm_started = time.monotonic()
    drawn = {
        group.name: calm_population(group, calm_sizes, args.calm_references, args.calm_windows, rng)
        for group in groups
    }
    calm_tallies = {name: tally for name, (tally, _) in drawn.items()}
    calm_by_size = calm_table(groups, calm_tallies, calm_sizes)
    calm_scored = {
        size: reduce(Tally.merged, [drawn[group.name][1][size] for group in chosen], Tally())
        for size in calm_sizes
    }
    print(f"calm windows {time.monotonic() - calm_started:.0f} s")

    chosen_names = ", ".join(group.name for group in chosen)
    for size, sized in by_size.items():
        repeated = [group.name for group in chosen if len(group.held_out) < size]
        print(
            f"\nOurs and the fixed cut-offs at windows of {size} samples ({chosen_names}; "
            f"drawn with replacement for {', '.join(repeated) or 'none'}), per feature and "
            f"window before persistence; the calm side is the windows drawn from these data "
            f"sets' populations ({calm_scored[size].windows} feature-windows): ours with its "
            f"rate moved to the calm rate the cut-off shows there, the calm rate ours shows with "
            f"its rate moved until it detects as much as the cut-off, and the cut-off moved to "
            f"the calm rate our verdict shows."
        )
        print(format_columns(matched(sized, calm_scored[size])[0], rule=True))
        print_shortfall(sized, calm_scored[size])
        print(
            f"\nThe same with the calm alarms spent feature by feature: ours moved on each "
            f"feature to the calm rate the cut-off shows on it (that feature's "
            f"{args.calm_references * args.calm_windows} calm windows from the population), "
            f"and to the detection the cut-off shows on it, the features' counts then added; "
            f"the features where the cut-off flags fewer than {RESOLVED} calm windows taken "
            f"together:"
        )
        print(format_columns(per_feature(sized, calm_scored[size])[0], rule=True))
    print(f"total {time.monotonic() - started:.0f} s")
    return 0 if goals_met(by_size, args.window, calm_by_size, calm_scored) else 1


def totals_at(
    size: int, groups: list[Group], args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Tally]:
    """Per scenario, the tallies of `groups` merged, at windows of `size` samples."""
    sized = argparse.Namespace(**{**vars(args), "window": size})
    return {
        scenario.name: reduce(
            Tally.merged,
            [run_group(scenario, group, sized, rng) for group in groups if scenario.applies(group)],
            Tally(),
        )
        for scenario in SCENARIOS
    }


@dataclass
class Calm:
    """Calm feature-windows (no shift): judged, drifted, alert open."""

    windows: int = 0
    drifted: int = 0
    open: int = 0

    def merged(self, other: Calm) -> Calm:
        return Calm(
            self.windows + other.windows, self.drifted + other.drifted, self.open + other.open
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


def feature_kind(group: Group, feature: str) -> str:
    if feature.endswith((":top1", ":confidence", ":prediction")):
        return "model outputs"
    if group.kind == "image":
        return "image summaries (mean, std)" if ":" in feature else "pooled pixels"
    return "tabular inputs"


def population_rows(group: Group, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows drawn with replacement from the data set's population."""
    return np.asarray(group.population[rng.integers(len(group.population), size=count)])


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
    the calm side of the goal against the fixed cut-offs (`matched`).
    """
    # Every window's rows at once: a row's feature values depend on that row alone.
    values = group.extract(population_rows(group, size * windows, rng))
    persistence = {feature: Persistence() for feature in reference}
    by_kind: dict[str, Calm] = {}
    for start in range(0, size * windows, size):
        live = {
            feature: count_into(values[feature][start : start + size], histogram.edges)
            for feature, (histogram, _) in reference.items()
        }
        for verdict in judge_window(reference, live).features:
            if verdict.status == "insufficient":
                continue
            drifted = verdict.status == "drift"
            transition = persistence[verdict.feature].update(drifted)
            calm = by_kind.setdefault(feature_kind(group, verdict.feature), Calm())
            calm.windows += 1
            calm.drifted += drifted
            calm.open += transition in ("open", "still-open")
            score(scored, reference[verdict.feature][1], verdict)
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


def clopper_pearson(hits: int, trials: int) -> tuple[float, float]:
    """Clopper-Pearson's 95% interval for `hits` in `trials` independent trials."""
    low = float(beta.ppf(0.025, hits, trials - hits + 1)) if hits > 0 else 0.0
    high = float(beta.ppf(0.975, hits + 1, trials - hits)) if hits < trials else 1.0
    return low, high


def goals_met(
    by_size: dict[int, dict[str, Tally]],
    window: int,
    calm_by_size: dict[int, Calm],
    calm_scored: dict[int, Tally],
) -> bool:
    shift = by_size[window]["mean +0.3 sigma"]
    checks = {
        f"no shift, windows of {size} from the population: alert open in <= 1% of "
        f"feature-windows (95% upper bound {100 * calm.open_bound():.2f}% over {calm.windows})": (
            calm.open_bound() <= 0.01
        )
        for size, calm in calm_by_size.items()
    }
    checks["mean +0.3 sigma: alert within 2 windows in >= 90% of runs"] = (
        shift.opened_by_two >= 0.9 * shift.runs
    )
    for size, totals in by_size.items():
        calm = calm_scored[size]
        for fixed, weaker in matched(totals, calm)[1].items():
            checks[
                f"windows of {size}, against {fixed} (calm: ours "
                f"{percent(calm.flagged['ours'], calm.windows, 2)}%, {fixed} "
                f"{percent(calm.flagged[fixed], calm.windows, 2)}%): as few false alarms "
                f"at its detection, as much detection at its false alarms "
                f"(not in: {', '.join(weaker) if weaker else 'none'})"
            ] = not weaker
    for goal, met in checks.items():
        print(f"{'met   ' if met else 'MISSED'} {goal}")
    print(
        "Beside the goals, the test against the fixed cut-offs feature by feature (`per_feature`):"
    )
    for size, totals in by_size.items():
        for fixed, weaker in per_feature(totals, calm_scored[size])[1].items():
            print(
                f"{'as good' if not weaker else 'weaker '} windows of {size}, against {fixed}, "
                f"at its calm rate and its detection on each feature "
                f"(not in: {', '.join(weaker) if weaker else 'none'})"
            )
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main())
