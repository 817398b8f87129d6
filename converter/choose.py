"""Choosing the candidate to ship: a pure function of the measurements.

Speed is judged head to head: each candidate and the float model run in
interleaved rounds (`PairedTiming`), and a candidate's speed is the median of
its per-round latency ratios to the float model, with a distribution-free
interval of that median. Load on the machine slows both models of a round
alike, so a ratio survives it where two separate latencies do not.

- Only candidates that meet the accuracy budget and produced finite outputs count.
- `latency` (default): a candidate must be clearly faster than the float model:
  the upper end of its interval at most 1 - MIN_SPEEDUP (at least 12 of 15
  rounds at that speed or better). Among those, the fastest structure (the
  quantized operators; its calibration variants run at one speed and are
  timed together, by their fastest run over all rounds); structures
  as fast as it (within LATENCY_TIE) and the calibration variants of each are
  told apart by accuracy, then size, then name, which do not vary from run to
  run. Candidates are ranked by their own time rather than by their ratio to
  float because load slows the float model and an int8 model unequally:
  measured at different moments, equally fast candidates get ratios far
  apart, while their own times stay close. Otherwise the float model ships and
  the report says why. A quantized model not clearly faster than float is
  never shipped.
- `size`: the smallest of those, if smaller than the float model; ties go to
  the faster.
- No candidate at all (nothing in the model can be quantized): the float model
  ships, and its verdict says why.
- A pinned candidate (ConvertOptions.candidate) is shipped if it meets the
  budget, whatever its speed (the report says what it is); otherwise the
  conversion fails.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefleet.converter.candidates import Candidate
from edgefleet.converter.errors import ConversionFailedError

Optimize = Literal["latency", "size"]

# A candidate must be at least this much faster than float, and clearly so.
MIN_SPEEDUP = 0.05
# Candidates this close to the fastest count as equally fast: the more accurate wins.
LATENCY_TIE = 0.10
# Coverage of the interval of the median ratio (order statistics of a binomial(n, 1/2)).
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedTiming:
    """Per interleaved round, the fastest time (ms) of one inference of a candidate and of
    float (`measure_paired` in evaluate.py)."""

    candidate_ms: tuple[float, ...]
    float_ms: tuple[float, ...]

    @property
    def rounds(self) -> int:
        return len(self.candidate_ms)

    @property
    def ratios(self) -> list[float]:
        """The per-round latency ratios to float, sorted."""
        return sorted(c / f for c, f in zip(self.candidate_ms, self.float_ms, strict=True))

    @property
    def ratio(self) -> float:
        """The median per-round ratio: below 1 is faster than float."""
        return statistics.median(self.ratios)

    @property
    def interval(self) -> tuple[float, float]:
        """A CONFIDENCE interval of the median ratio, free of any assumed distribution.

        The k-th smallest and k-th largest ratios, with k the largest rank such that
        a binomial(n, 1/2) falls below k with probability at most (1 - CONFIDENCE) / 2;
        with too few rounds for that, the smallest and largest ratios.
        """
        ratios, n = self.ratios, self.rounds
        tail = (1 - CONFIDENCE) / 2
        k, below = 0, 0.0
        while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
            below += math.comb(n, k) / 2**n
            k += 1
        k = max(k, 1)
        return ratios[k - 1], ratios[n - k]

    @property
    def best_ms(self) -> float:
        """The candidate's fastest run over all rounds: what load, which only adds time,
        disturbs least; candidates are ranked by it."""
        return min(self.candidate_ms)

    @property
    def rounds_faster(self) -> int:
        return sum(1 for r in self.ratios if r < 1)

    @property
    def clearly_faster(self) -> bool:
        return self.interval[1] <= 1 - MIN_SPEEDUP

    def describe(self) -> str:
        """E.g. "0.31x float latency (0.29-0.33), faster in 15/15 paired rounds"."""
        low, high = self.interval
        return (
            f"{self.ratio:.2f}x float latency ({low:.2f}-{high:.2f}), "
            f"faster in {self.rounds_faster}/{self.rounds} paired rounds"
        )


@dataclass
class Evaluation:
    candidate: Candidate
    path: Path | None = None
    size_bytes: int = 0
    latency_ms: float | None = None
    timing: PairedTiming | None = None  # against float; None for float itself
    metrics: dict[str, float] = field(default_factory=dict)
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # budget misses
    error: str | None = None  # quantization or evaluation failed
    notes: list[str] = field(default_factory=list)
    verdict: str = ""
    # Where latency was measured: `device ID (profile P)` or the build machine (docs/converter.md).
    measured_on: str = ""
    device_figures: dict[str, Any] | None = None  # p50/p90/p99, peak memory, smoke fidelity

    @property
    def usable(self) -> bool:
        return self.error is None and not self.failures and self.latency_ms is not None

    @property
    def is_float(self) -> bool:
        return self.candidate.method == "float"


def latency_ratio(evaluation: Evaluation) -> float | None:
    """The candidate's median latency ratio to float (1 for float itself)."""
    if evaluation.is_float:
        return 1.0
    return evaluation.timing.ratio if evaluation.timing is not None else None


def accuracy_score(evaluation: Evaluation) -> float:
    """Higher is better: accuracy, negated RMSE, or the worst output cosine."""
    metrics = evaluation.metrics
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "rmse" in metrics:
        return -metrics["rmse"]
    cosines = [v["cosine"] for v in evaluation.per_output.values() if "cosine" in v]
    return min(cosines, default=0.0)


def _speed(evaluation: Evaluation) -> str:
    if evaluation.timing is None:
        return "not timed"
    where = f", measured on {evaluation.measured_on}" if evaluation.measured_on else ""
    return evaluation.timing.describe() + where


def _structure(evaluation: Evaluation) -> str:
    """The candidate's name without its calibration method: the operators it runs."""
    return dataclasses.replace(evaluation.candidate, calibration=None).name


def _quality(evaluation: Evaluation) -> tuple[float, int, str]:
    """Sort key among equally fast candidates: more accurate, then smaller, then by name."""
    return (-accuracy_score(evaluation), evaluation.size_bytes, evaluation.candidate.name)


def speed_ranking(timed: list[Evaluation]) -> list[Evaluation]:
    """Timed evaluations, fastest first, in an order that timing noise barely moves.

    A candidate's time is its fastest run (`PairedTiming.best_ms`). Candidates
    of one structure (the same quantized operators, calibrated by different
    methods) run at one speed: they are timed together (the fastest of their
    runs) and ordered among themselves by `_quality` alone. Structures
    within LATENCY_TIE of the fastest count as equally fast and come first,
    ordered by their best candidate's quality; the others follow by time.
    """
    groups: dict[str, list[Evaluation]] = {}
    for evaluation in timed:
        groups.setdefault(_structure(evaluation), []).append(evaluation)
    for members in groups.values():
        members.sort(key=_quality)
    group_ms = {key: min(_best_ms(e) for e in members) for key, members in groups.items()}
    by_time = sorted(groups, key=lambda key: (group_ms[key], key))
    if not by_time:
        return []
    fastest_ms = group_ms[by_time[0]]
    tied = [key for key in by_time if group_ms[key] <= fastest_ms * (1 + LATENCY_TIE)]
    tied.sort(key=lambda key: _quality(groups[key][0]))
    order = tied + [key for key in by_time if key not in tied]
    return [evaluation for key in order for evaluation in groups[key]]


def _best_ms(evaluation: Evaluation) -> float:
    if evaluation.timing is not None:
        return evaluation.timing.best_ms
    return evaluation.latency_ms or 0.0


def _rejection(evaluation: Evaluation, chosen: Evaluation) -> str:
    if _structure(evaluation) == _structure(chosen):
        return "the same operators, less accurate or larger"
    as_fast = _best_ms(evaluation) <= _best_ms(chosen) * (1 + LATENCY_TIE)
    return "as fast, less accurate or larger" if as_fast else "slower"


def _choose_latency(usable: list[Evaluation]) -> tuple[Evaluation | None, str]:
    fast = [e for e in usable if e.timing is not None and e.timing.clearly_faster]
    for evaluation in usable:
        if evaluation not in fast:
            evaluation.verdict = (
                f"rejected: not clearly {1 - MIN_SPEEDUP:.2f}x float latency or faster: "
                f"{_speed(evaluation)}"
            )
    if not fast:
        return None, "no candidate within the accuracy budget is clearly faster than float"
    ranked = speed_ranking(fast)
    chosen = ranked[0]
    for evaluation in ranked[1:]:
        why = _rejection(evaluation, chosen)
        evaluation.verdict = f"rejected: {why} than {chosen.candidate.name}: {_speed(evaluation)}"
    return chosen, ""


def _choose_size(usable: list[Evaluation], baseline: Evaluation) -> tuple[Evaluation | None, str]:
    ranked = sorted(usable, key=lambda e: (e.size_bytes, latency_ratio(e) or 0.0, e.candidate.name))
    smaller = [e for e in ranked if e.size_bytes < baseline.size_bytes]
    for evaluation in ranked:
        evaluation.verdict = "rejected: size not the best within budget"
    if not smaller:
        return None, "no candidate within the accuracy budget is smaller than the float model"
    return smaller[0], ""


def choose(
    evaluations: list[Evaluation], optimize: Optimize, pinned: str | None = None
) -> Evaluation:
    """Pick the evaluation to ship and write every evaluation's verdict.

    `evaluations` must hold the float model's, with candidate method "float".
    `pinned` names the candidate to ship instead of choosing.

    Raises:
        ConversionFailedError: the pinned candidate failed or misses the budget.
    """
    baseline = next(e for e in evaluations if e.is_float)
    for evaluation in evaluations:
        if evaluation.error:
            evaluation.verdict = f"rejected: failed ({evaluation.error})"
        elif evaluation.failures:
            evaluation.verdict = "rejected: " + "; ".join(evaluation.failures)
    if pinned is not None:
        chosen = next(e for e in evaluations if e.candidate.name == pinned)
        if not chosen.usable:
            raise ConversionFailedError(
                f"the pinned candidate {pinned} cannot be shipped: "
                f"{chosen.verdict.removeprefix('rejected: ')}; pin another candidate or "
                "raise the budget"
            )
        why = "pinned" if chosen.is_float else f"pinned; {_speed(chosen)}"
    elif len(evaluations) == 1:
        chosen, why = baseline, "nothing in the model can be quantized"
    else:
        usable = [e for e in evaluations if e.usable and e is not baseline]
        found, why = (
            _choose_latency(usable) if optimize == "latency" else _choose_size(usable, baseline)
        )
        chosen = found or baseline
        if found is not None:
            why = _speed(found) if optimize == "latency" else f"smallest; {_speed(found)}"
    chosen.verdict = f"chosen: {why}"
    if chosen is not baseline:
        baseline.verdict = "kept as the on-device fallback"
    return chosen
