"""Prometheus metrics of one server, in the context's own registry.

    edgefleet_http_requests_total{method,route,status}     counter (route: the path template)
    edgefleet_http_request_duration_seconds{method,route}  histogram
    edgefleet_mqtt_messages_accepted_total{kind}           from the ingestion's counters
    edgefleet_mqtt_messages_refused_total{reason}          from the ingestion's counters
    edgefleet_ingest_dead_lettered_total{kind}             messages accepted that the database
                                                           refused to store (set aside)
    edgefleet_mqtt_messages_published_total{kind}          through the context's publisher
    edgefleet_directives_published_total                   the `directive` kind of the above
    edgefleet_mqtt_link_up                                 gauge: 1 while the MQTT link is connected
    edgefleet_mqtt_link_state_since_seconds                gauge: when it became so (Unix time)
    edgefleet_mqtt_link_connects_total                     connections made (the first included)
    edgefleet_mqtt_link_losses_total                       connections lost
    edgefleet_embedded_broker_restarts_total               the embedded broker started again
                                                           after its process ended unasked
    edgefleet_devices{online}                              gauge, read from the database
    edgefleet_rollouts{state}                              gauge, read from the database
    edgefleet_open_alerts{kind}                            gauge: drift alerts not resolved
    edgefleet_feature_drift_statistic{bundle,feature}      gauge: each cohort's last judged
                                                           statistic per feature
    edgefleet_labelled_accuracy{bundle}                    gauge: each version's accuracy
                                                           from labelled feedback
    edgefleet_webhook_deliveries_pending                   gauge: alert events still to be sent
    edgefleet_webhook_deliveries_failed                    gauge: alert events given up on
    edgefleet_dead_letters                                 gauge: dead letters kept (device
                                                           messages the database refused)
    edgefleet_metrics_database_up                          0 when the gauges could not be read

Database-backed gauges are read at scrape time (grouped COUNT queries, and
the cohorts' drift states); a failing database yields
`edgefleet_metrics_database_up 0` rather than a failed scrape. Drift
statistics are of cohorts only (one series per bundle version and feature),
of versions judged within the last `drift_window_max`, at most
MAX_DRIFT_SERIES series; labelled accuracy is of the versions with class labels
in the last `drift_window_max`, at most MAX_DRIFT_SERIES series too. Route labels
are templates (`/api/v1/devices/{device_id}`), and requests that match no route
share `unmatched`, so label cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.server.context import ServerContext
from edgefleet.server.db.models import Device, DriftState, Rollout, TelemetryBucket
from edgefleet.server.deadletters import count_dead_letters
from edgefleet.server.drift.accuracy import ACCURACY_DROP, Labelled
from edgefleet.server.drift.alerts import open_alerts_by_kind
from edgefleet.server.drift.cohorts import VERSION_COHORT
from edgefleet.server.drift.evaluator import ALERT_KINDS, COHORT
from edgefleet.server.errors import StorageError
from edgefleet.server.rollouts.machine import RolloutState
from edgefleet.server.webhooks.deliveries import delivery_counts

MAX_DRIFT_SERIES = 1000
ROLLOUT_STATES = tuple(s.value for s in RolloutState if s is not RolloutState.CREATED)


def _snapshot(counts: Mapping[str, int]) -> dict[str, int]:
    """A copy of counters another thread updates (without its lock)."""
    for _ in range(3):
        try:
            return dict(counts)
        except RuntimeError:  # a key was added while copying: try again
            continue
    return {}


class ApiMetrics:
    """The HTTP metrics of one app, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "edgefleet_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "edgefleet_http_request_duration_seconds",
            "Time to answer HTTP requests (to the end of the body).",
            ["method", "route"],
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


class ServerCollector(Collector):
    """MQTT and fleet figures read at scrape time from the context."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would read the database at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._mqtt()
        yield from self._database()

    def _mqtt(self) -> Iterator[Metric]:
        accepted = CounterMetricFamily(
            "edgefleet_mqtt_messages_accepted",
            "MQTT messages from devices accepted, by kind.",
            labels=["kind"],
        )
        refused = CounterMetricFamily(
            "edgefleet_mqtt_messages_refused",
            "MQTT messages from devices refused, by reason.",
            labels=["reason"],
        )
        dead_lettered = CounterMetricFamily(
            "edgefleet_ingest_dead_lettered",
            "MQTT messages from devices accepted, then set aside (dead letters) because the "
            "database refused to store them, by kind.",
            labels=["kind"],
        )
        ingest = self.context.ingest
        if ingest is not None:
            for kind, count in sorted(_snapshot(ingest.counts).items()):
                accepted.add_metric([kind], count)
            for reason, count in sorted(_snapshot(ingest.refused).items()):
                refused.add_metric([reason], count)
            for kind, count in sorted(_snapshot(ingest.dead_lettered).items()):
                dead_lettered.add_metric([kind], count)
        published = CounterMetricFamily(
            "edgefleet_mqtt_messages_published",
            "MQTT messages published by this server, by topic kind.",
            labels=["kind"],
        )
        counts = self.context.published
        for kind, count in sorted(counts.items()):
            published.add_metric([kind], count)
        directives = CounterMetricFamily(
            "edgefleet_directives_published",
            "Signed directives published to devices by this server.",
            value=counts.get("directive", 0),
        )
        yield from (accepted, refused, dead_lettered, published, directives)
        yield from self._link()

    def _link(self) -> Iterator[Metric]:
        if self.context.link is not None:
            link = self.context.link.status()
            yield GaugeMetricFamily(
                "edgefleet_mqtt_link_up",
                "1 while this server's MQTT link is connected.",
                value=int(link.connected),
            )
            yield GaugeMetricFamily(
                "edgefleet_mqtt_link_state_since_seconds",
                "When the MQTT link became connected, or was last seen up (Unix time).",
                value=link.since,
            )
            yield CounterMetricFamily(
                "edgefleet_mqtt_link_connects",
                "Connections of the MQTT link made (the first included).",
                value=link.connects,
            )
            yield CounterMetricFamily(
                "edgefleet_mqtt_link_losses",
                "Connections of the MQTT link lost.",
                value=link.losses,
            )
        if self.context.broker is not None:
            yield CounterMetricFamily(
                "edgefleet_embedded_broker_restarts",
                "Times the embedded broker was started again after its process ended unasked.",
                value=self.context.broker.restarts,
            )

    def _database(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "edgefleet_devices", "Enrolled devices, by online state.", labels=["online"]
        )
        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts, by state.", labels=["state"])
        try:
            with self.context.db.session() as session:
                by_online: dict[bool, int] = {
                    bool(online): int(count)
                    for online, count in session.execute(
                        select(Device.online, func.count()).group_by(Device.online)
                    )
                }
                by_state: dict[str, int] = {
                    str(state): int(count)
                    for state, count in session.execute(
                        select(Rollout.state, func.count()).group_by(Rollout.state)
                    )
                }
                alerts = open_alerts_by_kind(session)
                drift = self._drift_statistics(session)
                accuracy = self._labelled_accuracy(session)
                pending, failed = delivery_counts(
                    session, self.context.settings.webhook_max_attempts
                )
                dead_letters = count_dead_letters(session)
        except StorageError:
            yield GaugeMetricFamily(
                "edgefleet_metrics_database_up", "1 when the database answered.", value=0
            )
            return
        devices.add_metric(["true"], by_online.get(True, 0))
        devices.add_metric(["false"], by_online.get(False, 0))
        for state in sorted(set(ROLLOUT_STATES) | set(by_state)):
            rollouts.add_metric([state], by_state.get(state, 0))
        yield devices
        yield rollouts
        open_alerts = GaugeMetricFamily(
            "edgefleet_open_alerts", "Alerts not resolved, by kind.", labels=["kind"]
        )
        for kind in sorted({*ALERT_KINDS, ACCURACY_DROP} | set(alerts)):
            open_alerts.add_metric([kind], alerts.get(kind, 0))
        yield open_alerts
        yield drift
        yield accuracy
        yield GaugeMetricFamily(
            "edgefleet_webhook_deliveries_pending",
            "Alert events not delivered to the webhook yet, with attempts left.",
            value=pending,
        )
        yield GaugeMetricFamily(
            "edgefleet_webhook_deliveries_failed",
            "Alert events given up on after every attempt failed (until retried).",
            value=failed,
        )
        yield GaugeMetricFamily(
            "edgefleet_dead_letters",
            "Dead letters kept: device messages the database refused, not replayed or discarded.",
            value=dead_letters,
        )
        yield GaugeMetricFamily(
            "edgefleet_metrics_database_up", "1 when the database answered.", value=1
        )

    def _drift_statistics(self, session: Session) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(
            "edgefleet_feature_drift_statistic",
            "The drift statistic of each version cohort's last judged window, by bundle version "
            "and feature (the threshold it is compared with is in the alert's evidence).",
            labels=["bundle", "feature"],
        )
        since = self.context.clock() - self.context.settings.drift_window_max
        query = (
            select(
                DriftState.bundle_name,
                DriftState.bundle_version,
                DriftState.feature,
                DriftState.statistic,
            )
            .where(
                DriftState.scope == COHORT,
                DriftState.subject == VERSION_COHORT,
                DriftState.statistic.is_not(None),
                DriftState.window_end >= since,
            )
            .order_by(DriftState.bundle_name, DriftState.bundle_version, DriftState.feature)
            .limit(MAX_DRIFT_SERIES)
        )
        seen: set[tuple[str, str]] = set()  # an input and an output may share a name
        for name, version, feature, statistic in session.execute(query):
            labels = (f"{name}@{version}", feature)
            if statistic is not None and labels not in seen:
                seen.add(labels)
                gauge.add_metric(list(labels), statistic)
        return gauge

    def _labelled_accuracy(self, session: Session) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(
            "edgefleet_labelled_accuracy",
            "Accuracy (a share 0..1) of each bundle version's class-labelled feedback over the "
            "last drift_window_max (regression feedback is in GET /api/v1/accuracy).",
            labels=["bundle"],
        )
        since = self.context.clock() - self.context.settings.drift_window_max
        bucket = TelemetryBucket
        query = (
            select(
                bucket.bundle_name,
                bucket.bundle_version,
                func.sum(bucket.labelled_count),
                func.sum(bucket.labelled_correct),
                func.sum(bucket.labelled_abs_error),
                func.sum(bucket.labelled_squared_error),
            )
            .where(bucket.bucket_start >= since, bucket.labelled_count > 0)
            .group_by(bucket.bundle_name, bucket.bundle_version)
            .order_by(bucket.bundle_name, bucket.bundle_version)
            .limit(MAX_DRIFT_SERIES)
        )
        for name, version, count, correct, abs_sum, squared_sum in session.execute(query):
            labelled = Labelled(int(count), int(correct), float(abs_sum), float(squared_sum))
            accuracy = labelled.figures()["accuracy"]
            if accuracy is not None:
                gauge.add_metric([f"{name}@{version}"], accuracy)
        return gauge


class MetricsMiddleware:
    """Counts every HTTP answer by its route template (pure ASGI: sees 413s and 500s too)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts
        started = time.perf_counter()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(
                scope.get("method", "?"), route, status, time.perf_counter() - started
            )


def register_metrics(context: ServerContext) -> ApiMetrics:
    """Register the API's metrics and the server collector in `context.registry`.

    Raises:
        ValueError: they are registered already (one app per context).
    """
    metrics = ApiMetrics(context.registry)
    context.registry.register(ServerCollector(context))
    return metrics


__all__ = ["ApiMetrics", "MetricsMiddleware", "ServerCollector", "register_metrics"]
