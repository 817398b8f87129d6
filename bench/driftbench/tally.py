"""What a scenario's feature-windows show: our verdict, the fixed cut-offs' and the scores behind
them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgefleet.drift import Histogram
from edgefleet.driftstats import FeatureThresholds, FeatureVerdict, WindowVerdict, threshold_at

METHODS = ["ours", "KS p<.05", "chi2 p<.05", "PSI>0.2", "JS>0.1"]


FIXED_CUTOFFS = {"PSI>0.2": ("PSI", 0.2), "JS>0.1": ("JS", 0.1)}


WHOLE_WINDOW_METHODS = ["ours", *FIXED_CUTOFFS]  # the methods a window as a whole is counted by


@dataclass
class Tally:
    """Per method, flagged feature-windows; for ours also persistence."""

    windows: int = 0
    flagged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    open_windows: int = 0
    runs: int = 0
    opened_by_two: int = 0
    delays: list[int] = field(default_factory=list)
    # Per feature-window, what each method flags above a cut: ours (`window_scores`), ours with
    # the feature judged alone (`surprise`), PSI, JS.
    scores: dict[str, list[float]] = field(
        default_factory=lambda: {"ours": [], "alone": [], "PSI": [], "JS": []}
    )
    where: list[str] = field(default_factory=list)  # per feature-window: data set and kind
    features: list[str] = field(default_factory=list)  # per feature-window: the feature
    score_disagrees: int = 0  # feature-windows where our score above 0 is not our verdict
    # Whole windows: how many, and in how many ours and each fixed cut-off flag any feature.
    whole_windows: int = 0
    windows_flagged: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(WHOLE_WINDOW_METHODS, 0)
    )

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
            score_disagrees=self.score_disagrees + other.score_disagrees,
            whole_windows=self.whole_windows + other.whole_windows,
            windows_flagged={
                m: self.windows_flagged[m] + other.windows_flagged[m] for m in self.windows_flagged
            },
        )


def surprise(thresholds: FeatureThresholds | None, verdict: FeatureVerdict) -> float:
    """How far a feature-window lies beyond what the feature's verdict flags, in tail scales,
    judged alone (the rate not shared with other features: `window_scores` shares it).

    Our verdict on the feature alone, with its false-alarm rate moved from the
    calibrated a to a * exp(-x), flags exactly the windows whose surprise
    exceeds x: the statistic along the fitted tail, at the rate left by the
    outside test's share, or the outside test's chance below its share.
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


@dataclass(frozen=True)
class Scores:
    """One feature-window's place on our side: `shared` as the verdict judges it, `alone` with
    the feature judged alone (`surprise`)."""

    shared: float
    alone: float


def window_scores(
    references: Mapping[str, tuple[Histogram, FeatureThresholds | None]], window: WindowVerdict
) -> dict[str, Scores]:
    """Per feature of one window, how far beyond what our verdict flags it lies, in tail scales.

    Our verdict with its false-alarm rate moved from the calibrated a to
    a * exp(-x) flags exactly the features whose shared score exceeds x. The
    verdict shares the rate among the m features judged in the window by
    Benjamini and Hochberg's method (`judge_window`): ranked from the most
    surprising, the first k drift for the largest k whose chance is below
    a * k / m. So a feature's shared score is the largest, over itself and the
    features less surprising than it, of surprise less ln(m / rank): the ROC
    of the verdict itself, through its operating point. Features not judged
    (too few samples) score minus infinity.
    """
    alone = {
        verdict.feature: surprise(references[verdict.feature][1], verdict)
        for verdict in window.features
    }
    judged = [verdict.feature for verdict in window.features if verdict.status != "insufficient"]
    shared = dict.fromkeys(alone, -np.inf)
    highest = -np.inf
    ordered = sorted(judged, key=alone.__getitem__, reverse=True)
    for rank in range(len(ordered), 0, -1):
        feature = ordered[rank - 1]
        highest = max(highest, alone[feature] - np.log(len(ordered) / rank))
        shared[feature] = float(highest)
    return {feature: Scores(shared[feature], alone[feature]) for feature in alone}


def flags(verdict: FeatureVerdict) -> dict[str, bool]:
    """Whether our verdict and each fixed cut-off flag one feature-window."""
    flagged = {"ours": verdict.status == "drift"}
    for method, (name, limit) in FIXED_CUTOFFS.items():
        flagged[method] = (verdict.psi if name == "PSI" else verdict.js) > limit
    return flagged


def score(tally: Tally, verdict: FeatureVerdict, ours: Scores) -> None:
    """Count one feature-window: our verdict, the fixed cut-offs' and the scores behind them
    (`ours`: from `window_scores`)."""
    tally.windows += 1
    tally.features.append(verdict.feature)
    tally.scores["ours"].append(ours.shared)
    tally.scores["alone"].append(ours.alone)
    tally.score_disagrees += (ours.shared > 0) != (verdict.status == "drift")
    for method, flagged in flags(verdict).items():
        tally.flagged[method] += flagged
    tally.scores["PSI"].append(verdict.psi)
    tally.scores["JS"].append(verdict.js)


def score_whole(tally: Tally, judged: list[FeatureVerdict]) -> None:
    """Count one window as a whole: flagged by a method when any of its judged features is."""
    tally.whole_windows += 1
    flagged = [flags(verdict) for verdict in judged]
    for method in WHOLE_WINDOW_METHODS:
        tally.windows_flagged[method] += any(feature[method] for feature in flagged)


def percent(part: int, whole: int, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}" if whole else "-"
