"""GET /health and /metrics report the MQTT link: a real ServerLink on a real mosquitto.

The broker is stopped and started again under the link: health says the link is
down (and since when), answers 503 "degraded" with the reason once it has been
down longer than `mqtt_down_grace_s`, and counts the connects and the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.server.db.database import Database
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.trust import TrustRoot
from tests.agent.broker import WAIT, MosquittoBroker, unique_device_id
from tests.server.apiclient import Api, make_api
from tests.server.serverproc import wait_until

GRACE_S = 10.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path / "mosquitto") as running:
        yield running


def link_metrics(api: Api) -> dict[str, float]:
    text = api.client.get("/metrics").text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("edgefleet_mqtt_link_")
    }


def test_health_and_metrics_follow_the_link_through_a_broker_outage(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, broker: MosquittoBroker
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, mqtt_down_grace_s=GRACE_S)
    link = ServerLink(broker.url, unique_device_id("srv"), "edgefleet-server", lambda t, p: None)
    api.context.link = link
    link.start()
    try:
        assert link.wait_connected(WAIT)
        health = api.get("/health", None)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok" and health.json()["reason"] is None
        mqtt = health.json()["mqtt"]
        assert (mqtt["state"], mqtt["connects"], mqtt["losses"]) == ("connected", 1, 0)
        assert mqtt["broker_restarts"] is None  # an external broker
        assert link_metrics(api) == {
            "edgefleet_mqtt_link_up": 1.0,
            "edgefleet_mqtt_link_state_since_seconds": link.status().since,
            "edgefleet_mqtt_link_connects_total": 1.0,
            "edgefleet_mqtt_link_losses_total": 0.0,
        }

        broker.stop()
        assert wait_until(lambda: not link.status().connected, WAIT)
        # Down, but within the grace: still served, and it says so.
        health = api.get("/health", None)
        assert health.status_code == 200, health.text
        assert health.json()["mqtt"]["state"] == "disconnected"
        assert health.json()["mqtt"]["losses"] == 1
        assert link_metrics(api)["edgefleet_mqtt_link_up"] == 0.0

        api.clock.advance(GRACE_S + 60)  # the link has now been down longer than the grace
        health = api.get("/health", None)
        assert health.status_code == 503, health.text
        since = health.json()["mqtt"]["since"]
        assert health.json()["status"] == "degraded"
        assert health.json()["database"] == "ok"
        assert health.json()["reason"] == f"the MQTT link has been down since {since}"

        broker.start()
        assert link.wait_connected(WAIT)
        api.clock.advance(3600)  # connected: however late, no grace applies
        health = api.get("/health", None)
        assert health.status_code == 200, health.text
        mqtt = health.json()["mqtt"]
        assert (mqtt["state"], mqtt["connects"], mqtt["losses"]) == ("connected", 2, 1)
        metrics = link_metrics(api)
        assert metrics["edgefleet_mqtt_link_connects_total"] == 2.0
        assert metrics["edgefleet_mqtt_link_losses_total"] == 1.0
    finally:
        link.stop()
