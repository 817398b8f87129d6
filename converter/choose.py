"""Choosing the candidate to ship: a pure function of the measurements.

- Only candidates that meet the accuracy budget and produced finite outputs count.
- `latency` (default): the fastest of those (within LATENCY_TIE of the fastest,
  the most accurate), and only if it is at least MIN_SPEEDUP faster than the
  float model on this machine; otherwise the float model ships and the report
  says why. A quantized model slower than float is never shipped.
- `size`: the smallest of those, if smaller than the float model; ties go to
  the faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgefleet.converter.candidates import Candidate

Optimize = Literal["latency", "size"]

# Below this gain, a timing difference on a shared machine is noise, not speed.
MIN_SPEEDUP = 0.05
# Candidates this close to the fastest count as equally fast: the more accurate wins.
LATENCY_TIE = 0.03


@dataclass
class Evaluation:
    candidate: Candidate
    path: Path | None = None
    size_bytes: int = 0
    latency_ms: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # budget misses
    error: str | None = None  # quantization or evaluation failed
    notes: list[str] = field(default_factory=list)
    verdict: str = ""

    @property
    def usable(self) -> bool:
        return self.error is None and not self.failures and self.latency_ms is not None


def latency_ratio(evaluation: Evaluation, reference: Evaluation) -> float | None:
    if evaluation.latency_ms is None or not reference.latency_ms:
        return None
    return evaluation.latency_ms / reference.latency_ms


def accuracy_score(evaluation: Evaluation) -> float:
    """Higher is better: accuracy, negated RMSE, or the worst output cosine."""
    metrics = evaluation.metrics
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "rmse" in metrics:
        return -metrics["rmse"]
    cosines = [v["cosine"] for v in evaluation.per_output.values() if "cosine" in v]
    return min(cosines, default=0.0)


def choose(evaluations: list[Evaluation], optimize: Optimize) -> Evaluation:
    """Pick the evaluation to ship and write every evaluation's verdict.

    `evaluations` must hold the float model's, with candidate method "float".
    """
    baseline = next(e for e in evaluations if e.candidate.method == "float")
    for evaluation in evaluations:
        if evaluation.error:
            evaluation.verdict = f"rejected: failed ({evaluation.error})"
        elif evaluation.failures:
            evaluation.verdict = "rejected: " + "; ".join(evaluation.failures)
    usable = [e for e in evaluations if e.usable and e is not baseline]
    if optimize == "latency":
        assert baseline.latency_ms is not None
        limit = baseline.latency_ms * (1 - MIN_SPEEDUP)
        fast = [e for e in usable if (e.latency_ms or 0.0) <= limit]
        fastest = min((e.latency_ms or 0.0 for e in fast), default=0.0)
        tied = [e for e in fast if (e.latency_ms or 0.0) <= fastest * (1 + LATENCY_TIE)]
        winners = sorted(tied, key=lambda e: (-accuracy_score(e), e.size_bytes))
        winners += sorted((e for e in fast if e not in tied), key=lambda e: e.latency_ms or 0.0)
        ranked = sorted(usable, key=lambda e: e.latency_ms or 0.0)
        for evaluation in ranked:
            if evaluation not in winners:
                ratio = latency_ratio(evaluation, baseline) or 0.0
                evaluation.verdict = (
                    f"rejected: {ratio:.2f}x float latency, not {1 - MIN_SPEEDUP:.2f}x or faster"
                )
        why_float = "no candidate within the accuracy budget beats the float model's latency"
    else:
        ranked = sorted(usable, key=lambda e: (e.size_bytes, e.latency_ms or 0.0))
        winners = [e for e in ranked if e.size_bytes < baseline.size_bytes]
        why_float = "no candidate within the accuracy budget is smaller than the float model"
    chosen = winners[0] if winners else baseline
    for evaluation in winners[1:]:
        evaluation.verdict = f"rejected: {optimize} not the best within budget"
    chosen.verdict = "chosen" if chosen is not baseline else f"chosen: {why_float}"
    if chosen is not baseline:
        baseline.verdict = "kept as the on-device fallback"
    return chosen
