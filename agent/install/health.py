"""The health check under live traffic (the HEALTH_CHECKING state).

After activation the installer takes a mark on the predictor's counters and
waits up to `health.duration_seconds` for `health.min_requests` requests, then
judges what it saw:

- error rate above `max_error_rate`: fail;
- fallback rate above `max_fallback_rate`: fail;
- p95 latency above `max_latency_ratio` x the previous version's p95, measured
  on the traffic between the start of the install and activation: fail. Only
  judged when both periods have at least `min_requests` requests, since a p95 of
  a handful of requests (the first ones pay for warm-up) says little.

Rates are taken over at least `min_requests` requests: with fewer after the
full duration, the missing ones count as successes (errors / max(requests,
min_requests)). So one failure in a quiet check (1 of 3) does not roll back a
model (1/20 = 5%, not above 5%), while a model that fails most of the few
requests it gets (3 of 3: 15%) still fails the check. With no traffic at all
the install commits with a note saying it was not checked: an idle device (a
shelf, a night) must not hold an install open or roll back a model nobody has
used; the note reaches the server in the COMMITTED report, so a rollout gate
can insist on checked devices.

A check that passes also returns the median latency per sample it saw, which
the installer records as this device's measurement of the model
(edgefleet.agent.inference.timing).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.agent.errors import HealthCheckError
from edgefleet.agent.install.interfaces import Clock, HealthProbe, HealthSnapshot
from edgefleet.agentconfig import HealthSettings

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class HealthResult:
    note: str  # for the COMMITTED report
    sample_ms: float | None  # median latency per sample of the answered calls; None: none


@dataclass(frozen=True)
class Baseline:
    """The previous version's traffic before activation."""

    requests: int
    latency_p95_ms: float | None


def judge_health(
    snapshot: HealthSnapshot, baseline: Baseline | None, settings: HealthSettings
) -> str | None:
    """Why `snapshot` fails the check, or None when it passes. Pure."""
    requests = snapshot.requests
    if requests <= 0:
        return None
    enough = max(settings.min_requests, 1)
    for what, count, limit in (
        ("error", snapshot.errors, settings.max_error_rate),
        ("fallback", snapshot.fallbacks, settings.max_fallback_rate),
    ):
        rate = count / max(requests, enough)
        if rate > limit:
            over = f", counted over the {enough} the check needs" if requests < enough else ""
            return (
                f"{what} rate {rate:.1%} ({count} of {requests} requests{over}) is above "
                f"the limit {limit:.1%}"
            )
    if (
        baseline is not None
        and baseline.latency_p95_ms
        and snapshot.latency_p95_ms is not None
        and requests >= enough
        and baseline.requests >= enough
    ):
        limit = settings.max_latency_ratio * baseline.latency_p95_ms
        if snapshot.latency_p95_ms > limit:
            return (
                f"p95 latency {snapshot.latency_p95_ms:.2f} ms is above "
                f"{settings.max_latency_ratio:g} x the previous version's "
                f"{baseline.latency_p95_ms:.2f} ms"
            )
    return None


def run_health_check(
    probe: HealthProbe | None,
    clock: Clock,
    settings: HealthSettings,
    baseline: Baseline | None,
) -> HealthResult:
    """Watch live traffic on the new version; return the note for the COMMITTED report
    and the time per sample seen.

    Raises:
        HealthCheckError: the traffic seen fails `judge_health`.
    """
    if probe is None:
        return HealthResult(
            "committed without a health check: no predictor is running to observe", None
        )
    mark = probe.mark()
    deadline = clock.monotonic() + settings.duration_seconds
    enough = max(settings.min_requests, 1)
    while True:
        snapshot = probe.since(mark)
        remaining = deadline - clock.monotonic()
        if snapshot.requests >= enough or remaining <= 0:
            break
        clock.sleep(min(POLL_SECONDS, remaining))
    if snapshot.requests == 0:
        return HealthResult(
            f"committed unchecked: no traffic in {settings.duration_seconds:g} s of health check",
            None,
        )
    failure = judge_health(snapshot, baseline, settings)
    if failure is not None:
        raise HealthCheckError(f"health check failed: {failure}")
    p95 = snapshot.latency_p95_ms
    latency = f", p95 {p95:.2f} ms" if p95 is not None else ""
    short = (
        f" (fewer than the {settings.min_requests} wanted)" if snapshot.requests < enough else ""
    )
    note = (
        f"healthy over {snapshot.requests} requests{short}: {snapshot.errors} errors, "
        f"{snapshot.fallbacks} fallbacks{latency}"
    )
    return HealthResult(note, snapshot.sample_ms)
