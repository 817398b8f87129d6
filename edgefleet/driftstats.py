"""Drift verdicts from bin counts: the statistic, calibrated thresholds, persistence.

Pure Python (the server has no numpy). The counts a device sends are of values,
not of independent samples (an image feature pools every pixel of a channel),
so no textbook p-value applies: each feature's thresholds are calibrated by the
converter (`edgefleet.converter.driftcal`), which resamples whole reference
samples to measure how large the statistic gets between a reference and a
window when nothing drifted.

The cells: the reference's bins in order, with values below the first edge
counted in the first bin and values above the last edge in the last, and NaN as
a cell of its own.

The statistic has two parts (three for "tail-max-psi", below), sums of squared
two-sample z-scores of the window's shares against the reference's, over the
cells in order with NaN last.
The cumulative part is of the share below each boundary between cells
(cumulative shares, as the Anderson-Darling test compares them: the most
sensitive to shifts, and a rise of NaN moves every one of them). The cell part
is of each cell's own share (Pearson's chi-square: sensitive to changes of
spread, a value that repeats). Each z-score's variance comes from the pooled
share, with a pseudo-count of one half so that an empty cell never divides by
zero; cells empty on both sides add nothing. Without correlation between values
each part is about chi-square with one degree of freedom fewer than it has
terms; with correlation, larger.

Values a window holds outside the reference's range (below its first edge,
above its last) and NaN are also judged apart, where thresholds give the test a
share of their false-alarm rate (`outside_share`): under no drift a window's
and the reference's samples are exchangeable, so the chance that the window
holds at least as many of them as it does follows from the counts alone, with
no calibration (`outside_chance`). Values far outside the reference are the
plainest sign of drift, and folded into the outer bins they weigh no more than
any value in those bins.

Thresholds name the statistic they were calibrated for (`FeatureThresholds.
statistic`), and a feature is judged with that one:

- "tail-max-psi" (what the converter calibrates for features of one value
  per sample): "tail-max" over three parts, the third the PSI part
  (`psi_part`): PSI over the cells with the values below and above the range
  in cells of their own, times R L / (R + L), R and L the two sides' value
  counts (the weight the other parts' z-scores carry). Values outside the
  range weigh there as PSI weighs them, in cells of their own that no
  reference value reaches; folded into the outer bins (the other parts), they
  weigh no more than any value there;
- "tail-max": each part's excess over its own upper 1% level without drift
  (`part_levels`), in the scale of that part's tail beyond it
  (`part_scales`, the mean excess), both measured at calibration; the
  largest. Each part counts by how unlikely it is (an excess of s is a
  chance of about 1% times e^-s for that part), and the least likely
  decides, so a change that only one part sees is not diluted by the other
  parts' noise. Of the cumulative part and the cell part: what the converter
  calibrates for features of many values per sample, and bundles converted
  before "tail-max-psi";
- "scaled-sum" (bundles converted before "tail-max") divides each part by
  its upper 1% level and adds them;
- "sum" (thresholds that name none: bundles converted before those) adds the
  parts as they are.

PSI and the Jensen-Shannon distance, shown beside the verdict, use the same
cells, with the values below and above the range in cells of their own, and a
pseudo-count of one half in each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # edgefleet.drift imports this module for FeatureThresholds
    from edgefleet.drift import Histogram

PSEUDO_COUNT = 0.5
DATASET_SHARE = 0.5
PERSISTENCE_WINDOWS = 2
OUTSIDE_SHARE = 0.1  # of a feature's false-alarm rate, for the test of values outside the range
OUTSIDE_KINDS = 3  # below the range, above it, NaN: the outside test takes the least likely

Status = Literal["ok", "drift", "insufficient"]
StatisticName = Literal["sum", "scaled-sum", "tail-max", "tail-max-psi"]
# The parts each statistic combines: the cumulative and the cell part; "tail-max-psi" adds the
# PSI part.
PARTS: dict[str, int] = {"sum": 2, "scaled-sum": 2, "tail-max": 2, "tail-max-psi": 3}
TAIL_MAX = ("tail-max", "tail-max-psi")  # the statistics of the parts' largest excess
Transition = Literal["open", "still-open", "close", "quiet"]


class FeatureThresholds(BaseModel):
    """A feature's statistic thresholds, calibrated at several window sample counts.

    `by_window[n]` is the threshold that a window of n samples exceeds with
    probability `false_alarm` when nothing drifted. Beyond it the statistic's
    tail is taken as exponential with scale `tail[n]` (its mean excess over the
    threshold), which gives the thresholds for smaller false-alarm rates (many
    features judged at once). A window without a tail scale gets the most
    cautious one: an exponential tail from zero through the threshold.
    `values_per_sample` is how many values one sample adds to the counts (one
    for a per-sample feature, many for pooled pixels): it turns a window's
    counts into its sample count. `statistic` names the statistic they were
    calibrated for (absent: "sum"); "scaled-sum" needs `part_scales`, the
    cumulative and the cell part's scales; "tail-max" and "tail-max-psi" need
    them (the parts' tail scales, one per part in `PARTS`) and `part_levels`
    (their 1% levels), and a tail scale at every window, since their values
    and thresholds may be negative.
    `outside_share` (absent: no such test) is the share of `false_alarm` that
    the test of values outside the reference's range takes (`outside_chance`);
    the statistic is judged at the rest. Readers that predate it ignore it and
    judge the statistic at the whole rate, as its thresholds were calibrated.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    false_alarm: float = Field(gt=0, lt=1)
    by_window: dict[int, float] = Field(min_length=1)
    tail: dict[int, float] = Field(default_factory=dict)
    values_per_sample: float = Field(default=1.0, gt=0)
    statistic: StatisticName = "sum"
    part_scales: tuple[float, ...] | None = None
    part_levels: tuple[float, ...] | None = None
    outside_share: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _windows(self) -> FeatureThresholds:
        if (self.statistic == "sum") != (self.part_scales is None):
            raise ValueError(
                'part_scales are needed by every statistic but "sum", and only by them'
            )
        tail_max = self.statistic in TAIL_MAX
        if tail_max != (self.part_levels is not None):
            raise ValueError(
                f"part_levels are needed by the statistics {TAIL_MAX}, and only by them"
            )
        parts = PARTS[self.statistic]
        for name, values in (("part_scales", self.part_scales), ("part_levels", self.part_levels)):
            if values is not None and len(values) != parts:
                raise ValueError(f'"{self.statistic}" has {parts} {name}, one per part')
        if self.part_scales is not None and min(self.part_scales) <= 0:
            raise ValueError("part scales must be positive")
        if any(samples < 1 for samples in self.by_window):
            raise ValueError("window sample counts must be at least 1")
        if not set(self.tail) <= set(self.by_window):
            raise ValueError("every tail scale needs a threshold at the same window")
        if any(value < 0 for value in self.tail.values()):
            raise ValueError("tail scales must not be negative")
        if tail_max:
            if set(self.tail) != set(self.by_window):
                raise ValueError(f'"{self.statistic}" needs a tail scale at every window')
        elif any(value < 0 for value in self.by_window.values()):
            raise ValueError("thresholds must not be negative")
        return self


def _at_window(thresholds: FeatureThresholds, samples: int) -> tuple[float, float] | None:
    """The threshold at `false_alarm` and the tail scale for a window of `samples`."""

    def pair(window: int) -> tuple[float, float]:
        threshold = thresholds.by_window[window]
        fallback = threshold / math.log(1 / thresholds.false_alarm)
        return threshold, thresholds.tail.get(window, fallback)

    windows = sorted(thresholds.by_window)
    if samples < windows[0]:
        return None
    if samples >= windows[-1]:
        return pair(windows[-1])
    upper = next(window for window in windows if window > samples)
    lower = max(window for window in windows if window <= samples)
    weight = math.log(samples / lower) / math.log(upper / lower)
    (low_threshold, low_tail), (high_threshold, high_tail) = pair(lower), pair(upper)
    return (
        low_threshold + weight * (high_threshold - low_threshold),
        low_tail + weight * (high_tail - low_tail),
    )


def threshold_at(
    thresholds: FeatureThresholds, samples: int, false_alarm: float | None = None
) -> float | None:
    """The statistic threshold for a window of `samples`, or None below the smallest window.

    Between calibrated windows the threshold is interpolated linearly in the
    logarithm of the sample count; above the largest, the largest's applies.
    `false_alarm` (at most the calibrated rate; default: that rate) moves the
    threshold along the fitted tail.
    """
    rate = thresholds.false_alarm if false_alarm is None else false_alarm
    if not 0 < rate <= thresholds.false_alarm:
        raise ValueError(f"false_alarm must be in (0, {thresholds.false_alarm}], not {rate}")
    found = _at_window(thresholds, samples)
    if found is None:
        return None
    threshold, tail = found
    return threshold + tail * math.log(thresholds.false_alarm / rate)


def tail_probability(thresholds: FeatureThresholds, samples: int, value: float) -> float | None:
    """How often a window of `samples` reaches `value` when nothing drifted, from the fitted tail.

    At most the calibrated rate (a value below its threshold gets that rate);
    None below the smallest calibrated window.
    """
    found = _at_window(thresholds, samples)
    if found is None:
        return None
    threshold, tail = found
    if value <= threshold:
        return thresholds.false_alarm
    if tail == 0:
        return 0.0
    return thresholds.false_alarm * math.exp(-(value - threshold) / tail)


def _cells(histogram: Histogram) -> tuple[list[int], int]:
    """The ordered cells (values outside the edges folded into the outer bins) and the NaN cell."""
    ordered = list(histogram.counts)
    ordered[0] += histogram.below
    ordered[-1] += histogram.above
    return ordered, histogram.nan


def _check_edges(reference: Histogram, live: Histogram) -> None:
    if reference.edges != live.edges:
        raise ValueError("the live counts use other bin edges than the reference")


def _squared_z_sum(
    reference: list[int], live: list[int], reference_total: int, live_total: int, cumulative: bool
) -> float:
    """Sum of squared two-sample z-scores of shares: of cumulative shares, or of cell shares."""
    if reference_total == 0 or live_total == 0:
        return 0.0
    weight = reference_total * live_total / (reference_total + live_total)
    total = 0.0
    for reference_count, live_count in zip(reference, live, strict=True):
        pooled = (reference_count + live_count + PSEUDO_COUNT) / (
            reference_total + live_total + 2 * PSEUDO_COUNT
        )
        variance = pooled * (1 - pooled) if cumulative else pooled
        difference = reference_count / reference_total - live_count / live_total
        total += weight * difference**2 / variance
    return total


def _running(counts: list[int]) -> list[int]:
    sums, total = [], 0
    for count in counts:
        total += count
        sums.append(total)
    return sums


def statistic(
    reference: Histogram, live: Histogram, thresholds: FeatureThresholds | None = None
) -> float:
    """The drift statistic of a live window against the reference counts (see the module text).

    The one `thresholds` were calibrated for; without thresholds, "sum".
    """
    parts: tuple[float, ...] = statistic_parts(reference, live)
    if thresholds is None or thresholds.part_scales is None:
        return sum(parts)
    if PARTS[thresholds.statistic] == 3:
        parts = (*parts, psi_part(reference, live))
    scales = thresholds.part_scales
    if thresholds.part_levels is None:
        return sum(part / scale for part, scale in zip(parts, scales, strict=True))
    return max(
        (part - level) / scale
        for part, level, scale in zip(parts, thresholds.part_levels, scales, strict=True)
    )


def statistic_parts(reference: Histogram, live: Histogram) -> tuple[float, float]:
    """The statistic's cumulative part and cell part (see the module text)."""
    _check_edges(reference, live)
    reference_ordered, reference_nan = _cells(reference)
    live_ordered, live_nan = _cells(live)
    reference_cells, live_cells = [*reference_ordered, reference_nan], [*live_ordered, live_nan]
    reference_total, live_total = sum(reference_cells), sum(live_cells)
    cumulative = _squared_z_sum(
        _running(reference_ordered),
        _running(live_ordered),
        reference_total,
        live_total,
        cumulative=True,
    )
    cells = _squared_z_sum(
        reference_cells, live_cells, reference_total, live_total, cumulative=False
    )
    return cumulative, cells


def psi_part(reference: Histogram, live: Histogram) -> float:
    """The PSI part: `psi` times the two sides' value counts' harmonic weight, R L / (R + L).

    The weight is the other parts' (their z-scores carry it), so that without
    drift the part keeps about chi-square's scale at every window size.
    """
    reference_total, live_total = _value_count(reference), _value_count(live)
    if reference_total == 0 or live_total == 0:
        return 0.0
    weight = reference_total * live_total / (reference_total + live_total)
    return weight * psi(reference, live)


def _log_choose(total: int, chosen: int) -> float:
    return math.lgamma(total + 1) - math.lgamma(chosen + 1) - math.lgamma(total - chosen + 1)


def exchangeable_tail(
    reference_hits: int, reference_samples: int, window_hits: int, window_samples: int
) -> float:
    """The chance that a window holds at least `window_hits` samples of a kind, under no drift.

    Nothing drifted: the reference's and the window's samples are exchangeable,
    so the samples of the kind, on both sides together, fall among the window's
    as a draw without replacement (hypergeometric: Fisher's exact test, one
    side). With none in the reference, it is the chance that the window's
    `window_hits` samples lie below (or above) every reference sample, whatever
    the distribution. 1.0 when the window's share is no larger than the reference's.
    """
    if window_hits <= 0 or window_hits * reference_samples <= reference_hits * window_samples:
        return 1.0
    samples = reference_samples + window_samples
    hits = reference_hits + window_hits
    every_draw = _log_choose(samples, window_samples)
    chance = 0.0
    for drawn in range(window_hits, min(hits, window_samples) + 1):
        term = math.exp(
            _log_choose(hits, drawn)
            + _log_choose(samples - hits, window_samples - drawn)
            - every_draw
        )
        chance += term
        if term <= chance * 1e-12:  # beyond the mode the terms only fall
            break
    return min(1.0, chance)


def outside_chance(reference: Histogram, live: Histogram, values_per_sample: float = 1.0) -> float:
    """The chance that a window holds this many values outside the reference range, under no drift.

    Per kind (below the first edge, above the last, NaN): the window's values
    come from at least `values/values_per_sample` samples, the reference's from
    at most as many samples as values (both conservative for pooled values),
    judged by `exchangeable_tail`. The least likely kind decides, its chance
    multiplied by the number of kinds (Bonferroni).
    """
    _check_edges(reference, live)
    reference_samples = max(1, round(_value_count(reference) / values_per_sample))
    live_samples = max(1, round(_value_count(live) / values_per_sample))
    least = min(
        exchangeable_tail(
            min(reference_count, reference_samples),
            reference_samples,
            min(live_samples, math.ceil(live_count / values_per_sample)),
            live_samples,
        )
        for reference_count, live_count in (
            (reference.below, live.below),
            (reference.above, live.above),
            (reference.nan, live.nan),
        )
    )
    return min(1.0, OUTSIDE_KINDS * least)


def _value_count(histogram: Histogram) -> int:
    return sum(histogram.counts) + histogram.below + histogram.above + histogram.nan


def _shares(histogram: Histogram) -> list[float]:
    """Shares of the cells with the values below and above the range apart, NaN last."""
    counts = [histogram.below, *histogram.counts, histogram.above, histogram.nan]
    cells = [count + PSEUDO_COUNT for count in counts]
    total = sum(cells)
    return [cell / total for cell in cells]


def psi(reference: Histogram, live: Histogram) -> float:
    """The population stability index over the same cells (natural logarithm)."""
    _check_edges(reference, live)
    return sum(
        (live_share - reference_share) * math.log(live_share / reference_share)
        for reference_share, live_share in zip(_shares(reference), _shares(live), strict=True)
    )


def js_distance(reference: Histogram, live: Histogram) -> float:
    """The Jensen-Shannon distance over the same cells (natural logarithm, as scipy's)."""
    _check_edges(reference, live)
    divergence = 0.0
    for reference_share, live_share in zip(_shares(reference), _shares(live), strict=True):
        middle = (reference_share + live_share) / 2
        divergence += reference_share * math.log(reference_share / middle) / 2
        divergence += live_share * math.log(live_share / middle) / 2
    return math.sqrt(max(divergence, 0.0))


def window_samples(thresholds: FeatureThresholds | None, live: Histogram) -> int:
    """How many samples a window's counts come from."""
    per_sample = thresholds.values_per_sample if thresholds is not None else 1.0
    return round(_value_count(live) / per_sample)


def feature_chance(
    reference: Histogram, thresholds: FeatureThresholds, live: Histogram
) -> float | None:
    """The false-alarm rate above which the feature would be judged drifting.

    Each test's chance over its share of the rate: the statistic's from the
    fitted tail (at most the calibrated rate), the outside test's where the
    thresholds give it a share. None below the smallest calibrated window.
    """
    share = thresholds.outside_share or 0.0
    value = statistic(reference, live, thresholds)
    chance = tail_probability(thresholds, window_samples(thresholds, live), value)
    if chance is None:
        return None
    chance /= 1 - share
    if share:
        chance = min(chance, outside_chance(reference, live, thresholds.values_per_sample) / share)
    return chance


@dataclass(frozen=True)
class Outside:
    """The values of a window outside the reference's range, and the test of them."""

    below: int
    above: int
    nan: int
    chance: float  # `outside_chance`
    cut: float  # the share of the false-alarm rate it is judged at: drift when chance < cut


@dataclass(frozen=True)
class FeatureVerdict:
    feature: str
    samples: int
    statistic: float
    threshold: float | None  # None: no thresholds, or too few samples to judge
    status: Status
    psi: float
    js: float
    outside: Outside | None = None  # None: the thresholds give no outside test, or not judged


def judge_feature(
    name: str,
    reference: Histogram,
    thresholds: FeatureThresholds | None,
    live: Histogram,
    rate_share: float = 1.0,
) -> FeatureVerdict:
    """One feature's verdict, judged at `rate_share` of its false-alarm rate.

    Drift when the statistic exceeds its threshold at the rate left by the
    outside test's share, or the outside test's chance is below its share.
    """
    if not 0 < rate_share <= 1:
        raise ValueError("rate_share must be above 0 and at most 1")
    samples = window_samples(thresholds, live)
    value = statistic(reference, live, thresholds)
    threshold, outside = None, None
    if thresholds is not None:
        rate = thresholds.false_alarm * rate_share
        share = thresholds.outside_share or 0.0
        threshold = threshold_at(thresholds, samples, rate * (1 - share))
        if threshold is not None and share:
            chance = outside_chance(reference, live, thresholds.values_per_sample)
            outside = Outside(live.below, live.above, live.nan, chance, rate * share)
    status: Status = (
        "insufficient"
        if threshold is None
        else "drift"
        if value > threshold or (outside is not None and outside.chance < outside.cut)
        else "ok"
    )
    return FeatureVerdict(
        feature=name,
        samples=samples,
        statistic=value,
        threshold=threshold,
        status=status,
        psi=psi(reference, live),
        js=js_distance(reference, live),
        outside=outside,
    )


@dataclass(frozen=True)
class WindowVerdict:
    features: list[FeatureVerdict]
    drifted: list[str]
    dataset_drift: bool  # at least `dataset_share` of the judged features drifted


def judge_window(
    references: Mapping[str, tuple[Histogram, FeatureThresholds | None]],
    live: Mapping[str, Histogram],
    dataset_share: float = DATASET_SHARE,
) -> WindowVerdict:
    """Judge every feature that has both a reference and live counts.

    The features judged are those with thresholds and enough samples. They
    share the false-alarm rate by Benjamini and Hochberg's method: ranked by
    their chance (the least likely first), the first k drift for the largest
    k whose chance is below k / m of the rate, m features judged. In a window
    without drift the chance that any of them raises a false alarm stays
    within the rate, as with a plain division by m (Simes' inequality, which
    holds for features independent or moving together; the drift benchmark
    measures it). Once some drift, on average at most the rate's share of
    the features flagged are false alarms, so a change that many features
    see a little is found.
    """
    names = [name for name in references if name in live]
    relative: dict[str, float] = {}  # each feature's chance, over its false-alarm rate
    for name in names:
        reference, thresholds = references[name]
        if thresholds is not None:
            chance = feature_chance(reference, thresholds, live[name])
            if chance is not None:
                relative[name] = chance / thresholds.false_alarm
    ranked = sorted(relative, key=relative.__getitem__)
    judged = len(ranked)
    drifting = next((k for k in range(judged, 0, -1) if relative[ranked[k - 1]] < k / judged), 0)
    # Every feature judged at the same cut: the first `drifting` lie within it, the rest beyond.
    rate_share = max(drifting, 1) / judged if judged else 1.0
    verdicts = {
        name: judge_feature(name, *references[name], live[name], rate_share) for name in ranked
    }
    ordered = [
        verdicts.get(name) or judge_feature(name, *references[name], live[name]) for name in names
    ]
    drifted = [verdict.feature for verdict in ordered if verdict.status == "drift"]
    return WindowVerdict(
        features=ordered,
        drifted=drifted,
        dataset_drift=judged > 0 and len(drifted) >= dataset_share * judged,
    )


class Persistence:
    """Opens after `windows` drifted windows in a row, closes after `windows` calm ones in a row."""

    def __init__(self, windows: int = PERSISTENCE_WINDOWS, is_open: bool = False, streak: int = 0):
        if windows < 1:
            raise ValueError("windows must be at least 1")
        self.windows = windows
        self.is_open = is_open
        self.streak = streak  # consecutive windows that argue for changing the state

    def update(self, drifted: bool) -> Transition:
        if drifted != self.is_open:
            self.streak += 1
            if self.streak >= self.windows:
                self.is_open, self.streak = drifted, 0
                return "open" if drifted else "close"
        else:
            self.streak = 0
        return "still-open" if self.is_open else "quiet"

    def to_json(self) -> dict[str, int | bool]:
        """The state as a JSON object (a database column of JSON type stores it as it is)."""
        return {"windows": self.windows, "open": self.is_open, "streak": self.streak}

    @classmethod
    def from_json(cls, state: Mapping[str, int | bool]) -> Persistence:
        return cls(
            windows=int(state["windows"]), is_open=bool(state["open"]), streak=int(state["streak"])
        )
