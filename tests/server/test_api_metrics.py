"""GET /metrics: the HTTP, MQTT and fleet figures of one server, in its own registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.mqtt import DeviceTopics
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device
from edgefleet.server.errors import NotFoundError
from edgefleet.server.mqtt.ingest import Replay
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.server.apiclient import Api, make_api


class IngestFigures:
    """Our `Ingestion` interface with fixed figures."""

    def __init__(self) -> None:
        self.counts = {"heartbeat": 7, "telemetry": 3}
        self.refused = {"device-signature": 2}
        self.dead_lettered = {"status": 1}
        self.last_dead_letter = None

    def replay(self, letter_id: int) -> Replay:
        raise NotFoundError(f"no dead letter with id {letter_id}")  # it keeps none


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(sqlite_database, tmp_path, trust)


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_requests_are_counted_by_route_template_and_status(api: Api) -> None:
    api.get("/devices/cam-1")
    api.get("/devices/cam-2")
    api.get("/devices", None)
    api.get("/no-such-route")
    samples = scrape(api)
    key = "edgefleet_http_requests_total"
    route = "/api/v1/devices/{device_id}"
    assert samples[(key, (("method", "GET"), ("route", route), ("status", "404")))] == 2
    assert samples[(key, (("method", "GET"), ("route", "/api/v1/devices"), ("status", "401")))] == 1
    assert samples[(key, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1


def test_fleet_mqtt_and_directive_figures(api: Api) -> None:
    api.context.ingest = IngestFigures()
    for n in range(3):
        api.enroll(f"cam-{n}")
    with api.context.db.session() as session:
        session.get(Device, "cam-1").online = True  # type: ignore[union-attr]
    topics = DeviceTopics("cam-1")
    api.context.publisher.publish(topics.directive, b"{}", qos=1)
    api.context.publisher.publish(topics.directive, b"{}", qos=1)
    api.context.publisher.publish(topics.blocks_data, b"", qos=0)
    assert len(api.publisher.calls) == 3  # passed through to the real publisher

    samples = scrape(api)
    assert samples[("edgefleet_devices", (("online", "true"),))] == 1
    assert samples[("edgefleet_devices", (("online", "false"),))] == 2
    assert samples[("edgefleet_rollouts", (("state", "running"),))] == 0
    assert samples[("edgefleet_mqtt_messages_accepted_total", (("kind", "heartbeat"),))] == 7
    refused = ("edgefleet_mqtt_messages_refused_total", (("reason", "device-signature"),))
    assert samples[refused] == 2
    assert samples[("edgefleet_ingest_dead_lettered_total", (("kind", "status"),))] == 1
    assert samples[("edgefleet_directives_published_total", ())] == 2
    published = "edgefleet_mqtt_messages_published_total"
    assert samples[(published, (("kind", "blocks_data"),))] == 1
    assert samples[("edgefleet_metrics_database_up", ())] == 1


def test_two_apps_do_not_share_metrics(
    api: Api, sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    other = make_api(sqlite_database, tmp_path / "other", trust)
    api.get("/bundles", Role.VIEWER)
    samples = scrape(other)
    assert not any(
        name == "edgefleet_http_requests_total" and ("route", "/api/v1/bundles") in labels
        for name, labels in samples
    )
