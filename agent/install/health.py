"""The health check under live traffic (the HEALTH_CHECKING state).

After activation the installer takes a mark on the predictor's counters and
waits up to `health.duration_seconds` for `health.min_requests` requests, then
judges what it saw:

- error rate (errors / requests) above `max_error_rate`: fail;
- fallback rate above `max_fallback_rate`: fail;
- p95 latency above `max_latency_ratio` x the previous version's p95, measured
  on the traffic between the start of the install and activation: fail. Only
  judged when both periods have at least `min_requests` requests, since a p95 of
  a handful of requests (the first ones pay for warm-up) says little.

With fewer than `min_requests` after the full duration the rates are judged on
what there is. With no traffic at all the install commits with a note saying
it was not checked: an idle device (a shelf, a night) must not hold an install
open or roll back a model nobody has used; the note reaches the server in the
COMMITTED report, so a rollout gate can insist on checked devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.agent.config import HealthSettings
from edgefleet.agent.errors import HealthCheckError
from edgefleet.agent.install.interfaces import Clock, HealthProbe, HealthSnapshot

POLL_SECONDS = 1.0


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
    error_rate = snapshot.errors / requests
    if error_rate > settings.max_error_rate:
        return (
            f"error rate {error_rate:.1%} ({snapshot.errors} of {requests} requests) is above "
            f"the limit {settings.max_error_rate:.1%}"
        )
    fallback_rate = snapshot.fallbacks / requests
    if fallback_rate > settings.max_fallback_rate:
        return (
            f"fallback rate {fallback_rate:.1%} ({snapshot.fallbacks} of {requests} requests) "
            f"is above the limit {settings.max_fallback_rate:.1%}"
        )
    enough = max(settings.min_requests, 1)
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
) -> str:
    """Watch live traffic on the new version; return a note for the COMMITTED report.

    Raises:
        HealthCheckError: the traffic seen fails `judge_health`.
    """
    if probe is None:
        return "committed without a health check: no predictor is running to observe"
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
        return f"committed unchecked: no traffic in {settings.duration_seconds:g} s of health check"
    failure = judge_health(snapshot, baseline, settings)
    if failure is not None:
        raise HealthCheckError(f"health check failed: {failure}")
    p95 = snapshot.latency_p95_ms
    latency = f", p95 {p95:.2f} ms" if p95 is not None else ""
    short = (
        f" (fewer than the {settings.min_requests} wanted)" if snapshot.requests < enough else ""
    )
    return (
        f"healthy over {snapshot.requests} requests{short}: {snapshot.errors} errors, "
        f"{snapshot.fallbacks} fallbacks{latency}"
    )
