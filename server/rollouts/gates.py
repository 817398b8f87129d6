"""Stage gates: whether a rollout stage advances, waits or fails, as a function of data.

`evaluate_stage(gates, counts, shadow=...)` looks only at its arguments (the
driver gathers `StageCounts` from the database), so every branch is tested
without a database or a broker.

Decision, in this order:

1. FAIL when any check fails: the failure share ((failed + timed_out) /
   assigned) is above `max_failure_share`; with at least `min_requests`
   requests, the error rate, the fallback rate or the p95 latency against the
   previous version's is beyond its limit; in a shadow stage with at least
   `min_requests` shadow comparisons, the agreement is below
   `min_shadow_agreement`; with `max_drift` set, the share of the stage's
   devices that installed and have an open drift alert of the new version is
   above it, or the stage's cohort has one; with `max_accuracy_drop` set and
   at least `min_labels` labelled requests, the labelled accuracy fell more
   than that below the reference (RMSE rose more than that share above it,
   for regression); or every device finished and the success share is still
   below `min_success_share` (no later report can change it).
2. ADVANCE when the success share is reached, `min_reporting` devices sent
   telemetry for the new version (capped at the devices that installed), and the stage
   baked for `bake_s` since it settled (every device finished) or, when some
   devices have not finished (typically offline), since the success share was
   reached. Health checks without enough requests are "not judged" and do not
   hold a stage back: a stage is not kept waiting for traffic it may never get.
3. WAIT otherwise, with reasons naming what is missing.

Shares and rates are compared exactly (as fractions of the decimal values
given), so 9 of 10 devices meets a 0.9 share and 1 failure of 10 does not
exceed a 0.1 limit.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from edgefleet.server.drift.accuracy import Labelled, ReferenceAccuracy
from edgefleet.server.rollouts.plan import Gates

SHOWN = 3  # devices and features named in a check's detail before "and N more"


@dataclass(frozen=True)
class Drifting:
    """A device of the stage with open drift alerts of the new version, on these features
    ("dataset" for dataset drift)."""

    device_id: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class StageCounts:
    """What the driver knows about one stage's devices and their traffic.

    Device counts are of the stage's own devices (by RolloutDevice state);
    `offline` are assigned devices offline and not finished; `reporting` are
    devices that sent telemetry for the new version since the stage started.
    Traffic counts are of the new version on the stage's devices since the
    stage started, but for the p95 latencies, which read only the newest
    buckets (`latency.latency_lookback`, `latency_minutes` back): `latency_p95_ms`
    of the new version, `previous_latency_p95_ms` of the previous version before
    the stage.
    `drifting`: the stage's devices that installed the new version and have
    open drift alerts of it opened since the stage started; `cohort_drift`:
    the features of the stage cohort's such alerts. `labels`: labelled
    feedback of the new version on the stage's devices since the stage
    started; `previous_labels`: of the previous version on the same devices
    over as long before the stage; `reference`: the bundle's reference
    accuracy from the converter's report (None without one).
    `settled_elapsed_s`: seconds since every device finished (succeeded, failed
    or timed out), None while some have not. `success_elapsed_s`: seconds since
    the success share was reached (the driver may pass the time since the most
    recent device finished: never longer), None when unknown.
    `telemetry_read_at`: when the traffic, latency and label counts were read (a
    large stage's reading is kept a few seconds: `stagetelemetry`), None when unknown.
    """

    assigned: int = 0
    pending: int = 0
    notified: int = 0
    installing: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    offline: int = 0
    reporting: int = 0
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    latency_p95_ms: float | None = None
    previous_latency_p95_ms: float | None = None
    latency_minutes: int | None = None  # how far back each p95 reads
    shadow_requests: int = 0
    shadow_agreements: int = 0
    drifting: tuple[Drifting, ...] = ()
    cohort_drift: tuple[str, ...] = ()
    labels: Labelled = field(default_factory=Labelled)
    previous_labels: Labelled = field(default_factory=Labelled)
    reference: ReferenceAccuracy | None = None
    stage_elapsed_s: float = 0.0
    settled_elapsed_s: float | None = None
    success_elapsed_s: float | None = None
    telemetry_read_at: dt.datetime | None = None

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.timed_out


class GateDecision(str, enum.Enum):
    ADVANCE = "advance"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class GateCheck:
    """One gate's result: passed True/False, or None when not (yet) judged."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Verdict:
    decision: GateDecision
    reasons: list[str]
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: {"decision", "reasons", "checks": [{"name", "passed", "detail"}]}."""
        return {
            "decision": self.decision.value,
            "reasons": list(self.reasons),
            "checks": [asdict(check) for check in self.checks],
        }


def _exact(value: float) -> Fraction:
    return Fraction(repr(value))


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def _failure_check(gates: Gates, c: StageCounts) -> GateCheck:
    bad = c.failed + c.timed_out
    detail = (
        f"{bad} of {c.assigned} devices failed or timed out ({_pct(bad, c.assigned)}; "
        f"at most {gates.max_failure_share:g})"
    )
    passed = Fraction(bad, c.assigned) <= _exact(gates.max_failure_share)
    return GateCheck("max_failure_share", passed, detail)


def _success_check(gates: Gates, c: StageCounts) -> GateCheck:
    needed = math.ceil(_exact(gates.min_success_share) * c.assigned)
    if c.succeeded >= needed:
        passed: bool | None = True
        detail = f"{c.succeeded} of {c.assigned} devices installed ({needed} needed)"
    elif c.finished == c.assigned:
        passed = False
        detail = (
            f"every device finished and {c.succeeded} of {c.assigned} installed "
            f"({_pct(c.succeeded, c.assigned)}; at least {gates.min_success_share:g})"
        )
    else:
        passed = None
        offline = f", {c.offline} offline" if c.offline else ""
        detail = (
            f"waiting: {c.succeeded} of {c.assigned} devices installed ({needed} needed{offline})"
        )
    return GateCheck("min_success_share", passed, detail)


def _health_checks(gates: Gates, c: StageCounts) -> list[GateCheck]:
    checks: list[GateCheck] = []
    enough = c.requests >= gates.min_requests
    short = f"not judged: {c.requests} of {gates.min_requests} requests needed"
    for name, count, what, limit in (
        ("max_error_rate", c.errors, "errors", gates.max_error_rate),
        ("max_fallback_rate", c.fallbacks, "fallbacks", gates.max_fallback_rate),
    ):
        if not enough:
            checks.append(GateCheck(name, None, short))
            continue
        rate = Fraction(count, c.requests)
        detail = (
            f"{count} {what} in {c.requests} requests ({_pct(count, c.requests)}; "
            f"at most {limit:g})"
        )
        checks.append(GateCheck(name, rate <= _exact(limit), detail))
    checks.append(_latency_check(gates, c, enough, short))
    return checks


def _span(minutes: int) -> str:
    """`minutes` in words: "50 min", "8.33 h"."""
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.3g} h"


def _latency_check(gates: Gates, c: StageCounts, enough: bool, short: str) -> GateCheck:
    name = "max_latency_p95_ratio"
    if not enough:
        return GateCheck(name, None, short)
    now, before = c.latency_p95_ms, c.previous_latency_p95_ms
    if now is None:
        return GateCheck(name, None, "not judged: no latency reported")
    if before is None or before <= 0:
        return GateCheck(name, None, "not judged: no latency of the previous version")
    ratio = now / before
    reach = "" if c.latency_minutes is None else f", each over {_span(c.latency_minutes)}"
    detail = (
        f"p95 {now:g} ms vs {before:g} ms before{reach} (x{ratio:.2f}; "
        f"at most x{gates.max_latency_p95_ratio:g})"
    )
    return GateCheck(name, ratio <= gates.max_latency_p95_ratio, detail)


def _shadow_check(gates: Gates, c: StageCounts, shadow: bool) -> GateCheck:
    name = "min_shadow_agreement"
    if not shadow:
        return GateCheck(name, None, "not judged: not a shadow stage")
    if c.shadow_requests < gates.min_requests:
        return GateCheck(
            name,
            None,
            f"not judged: {c.shadow_requests} of {gates.min_requests} shadow comparisons needed",
        )
    detail = (
        f"{c.shadow_agreements} of {c.shadow_requests} shadow answers agree "
        f"({_pct(c.shadow_agreements, c.shadow_requests)}; at least "
        f"{gates.min_shadow_agreement:g})"
    )
    agreement = Fraction(c.shadow_agreements, c.shadow_requests)
    return GateCheck(name, agreement >= _exact(gates.min_shadow_agreement), detail)


def _names(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _drift_check(gates: Gates, c: StageCounts, shadow: bool) -> GateCheck:
    name = "max_drift"
    if gates.max_drift is None:
        return GateCheck(name, None, "not judged: max_drift is not set")
    if shadow:
        return GateCheck(name, None, "not judged: shadow devices do not serve the new version")
    if c.reporting == 0:
        return GateCheck(name, None, "not judged: no telemetry of the new version yet")
    devices = [f"{d.device_id} ({_names(list(d.features))})" for d in c.drifting]
    which = f": {_names(devices)}" if devices else ""
    detail = f"{len(c.drifting)} of {c.assigned} devices drift{which}; at most {gates.max_drift:g}"
    passed = Fraction(len(c.drifting), c.assigned) <= _exact(gates.max_drift)
    if c.cohort_drift:
        detail += f"; the stage's devices drift as a whole ({_names(list(c.cohort_drift))})"
        passed = False
    return GateCheck(name, passed, detail)


def _rmse(labelled: Labelled) -> float:
    return math.sqrt(labelled.squared_error / labelled.count)


def _accuracy_check(gates: Gates, c: StageCounts) -> GateCheck:
    name = "max_accuracy_drop"
    drop = gates.max_accuracy_drop
    if drop is None:
        return GateCheck(name, None, "not judged: max_accuracy_drop is not set")
    labels, before = c.labels, c.previous_labels
    if labels.count < gates.min_labels:
        return GateCheck(
            name, None, f"not judged: {labels.count} of {gates.min_labels} labels needed"
        )
    if c.reference is not None:
        metric, source = c.reference.metric, "the converter's reference"
        reference_share = _exact(c.reference.value)
        reference_rmse = c.reference.value
    elif before.count >= gates.min_labels:
        metric = "rmse" if before.regression else "accuracy"
        source = "the previous version before the stage"
        reference_share = Fraction(before.correct, before.count)
        reference_rmse = _rmse(before)
    else:
        return GateCheck(
            name,
            None,
            f"not judged: no reference accuracy, and {before.count} of {gates.min_labels} "
            "labels of the previous version",
        )
    if metric == "rmse":
        ratio = 1 + drop
        detail = (
            f"RMSE {_rmse(labels):.4g} over {labels.count} labels vs {reference_rmse:.4g} "
            f"from {source} (at most x{ratio:g})"
        )
        return GateCheck(name, _rmse(labels) <= reference_rmse * ratio, detail)
    detail = (
        f"{labels.correct} of {labels.count} labels right ({_pct(labels.correct, labels.count)}) "
        f"vs {float(100 * reference_share):.1f}% from {source} (at most {drop:g} lower)"
    )
    share = Fraction(labels.correct, labels.count)
    return GateCheck(name, share >= reference_share - _exact(drop), detail)


def _reporting_check(gates: Gates, c: StageCounts) -> GateCheck:
    # Capped at the devices that installed: a failed one never reports the new version,
    # and the success share already says how many must install.
    needed = min(gates.min_reporting, c.succeeded)
    if c.reporting >= needed:
        detail = f"telemetry from {c.reporting} devices ({needed} needed)"
        return GateCheck("min_reporting", True, detail)
    detail = f"waiting: telemetry from {c.reporting} of {needed} devices needed"
    return GateCheck("min_reporting", None, detail)


def _bake_check(gates: Gates, c: StageCounts, success: GateCheck) -> GateCheck:
    name = "bake_s"
    if success.passed is not True:
        return GateCheck(name, None, "not started: the success share is not reached")
    elapsed = c.settled_elapsed_s if c.settled_elapsed_s is not None else c.success_elapsed_s
    if elapsed is None:
        left = c.assigned - c.finished
        offline = f", {c.offline} offline" if c.offline else ""
        return GateCheck(
            name, None, f"waiting: {left} device(s) still to finish{offline} before baking"
        )
    if elapsed >= gates.bake_s:
        return GateCheck(name, True, f"baked {elapsed:.0f} s of {gates.bake_s:g} s")
    return GateCheck(name, None, f"baking: {elapsed:.0f} s of {gates.bake_s:g} s")


def evaluate_stage(gates: Gates, counts: StageCounts, *, shadow: bool) -> Verdict:
    """Decide whether the stage described by `counts` advances, waits or fails.

    A stage without devices (a selection smaller than the number of stages)
    advances at once.
    """
    if counts.assigned <= 0:
        return Verdict(GateDecision.ADVANCE, ["the stage has no devices of its own"], [])
    success = _success_check(gates, counts)
    checks = [
        _failure_check(gates, counts),
        success,
        *_health_checks(gates, counts),
        _shadow_check(gates, counts, shadow),
        _drift_check(gates, counts, shadow),
        _accuracy_check(gates, counts),
        _reporting_check(gates, counts),
        _bake_check(gates, counts, success),
    ]
    failed = [check for check in checks if check.passed is False]
    if failed:
        reasons = [f"{check.name}: {check.detail}" for check in failed]
        return Verdict(GateDecision.FAIL, reasons, checks)
    blocking = ("min_success_share", "min_reporting", "bake_s")
    waiting = [c for c in checks if c.name in blocking and c.passed is None]
    if waiting:
        # The bake check only says "not started" while the success share is the reason.
        reasons = [c.detail for c in waiting if not c.detail.startswith("not started")]
        return Verdict(GateDecision.WAIT, reasons, checks)
    return Verdict(GateDecision.ADVANCE, ["every gate passed"], checks)


__all__ = [
    "Drifting",
    "GateCheck",
    "GateDecision",
    "StageCounts",
    "Verdict",
    "evaluate_stage",
]
