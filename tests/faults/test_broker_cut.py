"""An agent cut off from the broker for two minutes mid-install catches up when it is back.

Three agents, one of them reaching mosquitto through a TCP relay the test cuts
(connections dropped, new ones refused). A one-stage rollout of demo@1.0.0
starts; the relay is cut as soon as that agent starts downloading, and stays
cut for the real two minutes: longer than the agent's keepalive (5 s: the
broker publishes its will within 7.5 s and the server marks it offline) and
than the server's `offline_after` (120 s). The agent downloads over HTTP and
commits meanwhile (its health check lasts 30 s, well inside the cut), keeping
its reports in its outbox; the rollout waits for it. Once the relay is back the
agent reconnects within its reconnect backoff (at most 120 s after two minutes
of failed attempts), its reports arrive, each stored once, the rollout
completes, and the device installed once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from edgefleet.agent.outbox import outbox_is_empty
from edgefleet.mqtt.session import RECONNECT_BACKOFF
from tests.faults.conftest import WAIT, CuttableProxy, FaultFleet
from tests.server.serverproc import wait_until

CUT_S = 120.0
HEALTH_CHECK_S = 30.0


@pytest.fixture
def proxy(fleet: FaultFleet) -> Iterator[CuttableProxy]:
    relay = CuttableProxy(fleet.broker.url)
    try:
        yield relay
    finally:
        relay.close()


def test_an_agent_cut_off_from_the_broker_catches_up_when_the_link_is_back(
    fleet: FaultFleet, proxy: CuttableProxy
) -> None:
    devices = [f"cut-{index}" for index in range(3)]
    cut_off = fleet.add_agent(devices[0], mqtt_url=proxy.url, health_check_s=HEALTH_CHECK_S)
    for device in devices[1:]:
        fleet.add_agent(device)
    assert wait_until(lambda: fleet.online(devices), WAIT), fleet.logs()

    rollout = fleet.start_rollout("1.0.0", [{"percent": 100}])
    assert wait_until(lambda: "install downloading" in cut_off.log, WAIT), fleet.logs()
    proxy.cut()
    cut_at = time.monotonic()
    assert wait_until(lambda: not fleet.devices()[cut_off.device_id]["online"], WAIT), fleet.logs()
    # Committed on the device while cut off: the server has not heard of it yet.
    assert wait_until(lambda: cut_off.install_state() == "committed", WAIT), cut_off.log
    assert not outbox_is_empty(cut_off.layout.outbox)
    assert fleet.devices()[cut_off.device_id]["model_version"] is None
    assert wait_until(
        lambda: all(fleet.devices()[d]["model_version"] == "1.0.0" for d in devices[1:]), WAIT
    ), fleet.logs()
    time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
    during = fleet.rollout(rollout)
    assert during["state"] == "running", during
    assert not fleet.devices()[cut_off.device_id]["online"]

    proxy.restore()
    final = fleet.wait_for_state(
        rollout, {"completed", "paused", "aborted", "failed"}, RECONNECT_BACKOFF.maximum + WAIT
    )
    assert final["state"] == "completed", final
    for device in devices:
        fleet.account(fleet.agents[device])
