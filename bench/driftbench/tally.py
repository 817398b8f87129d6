"""What a scenario's feature-windows show: our verdict, the fixed cut-offs' and the scores behind
them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgefleet.driftstats import FeatureThresholds, FeatureVerdict, threshold_at

METHODS = ["ours", "KS p<.05", "chi2 p<.05", "PSI>0.2", "JS>0.1"]


FIXED_CUTOFFS = {"PSI>0.2": ("PSI", 0.2), "JS>0.1": ("JS", 0.1)}


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


def percent(part: int, whole: int, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}" if whole else "-"
