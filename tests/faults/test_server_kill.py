"""The server killed with SIGKILL mid-rollout and started again: the rollout completes.

Three agents; a two-stage rollout of demo@1.0.0; the server is killed (no
clean-up, no MQTT DISCONNECT) as soon as a device was sent its directive, and a
new server process starts on the same port and database. It waits out the
killed one's lease (15 s), settles what the devices did meanwhile from their
heartbeats and sends unanswered directives again. The rollout completes, no
status report is stored twice, every device installed 1.0.0 once, and every
report is stored but those sent before the killed process's MQTT session
expired (5 s): the broker hands that session its share of them and nobody
reads it, the loss docs/server.md states for a crashed replica.
"""

from __future__ import annotations

import time

from tests.faults.conftest import WAIT, FaultFleet
from tests.server.serverproc import wait_until

SESSION_EXPIRY_S = 5  # the server's MQTT session expiry: a third of its 15 s lease TTL


def test_a_server_killed_mid_rollout_finishes_it_after_restart(fleet: FaultFleet) -> None:
    devices = [f"kil-{index}" for index in range(3)]
    for device in devices:
        fleet.add_agent(device)
    assert wait_until(lambda: fleet.online(devices), WAIT), fleet.logs()

    rollout = fleet.start_rollout("1.0.0", [{"percent": 34}, {"percent": 100}])
    assert wait_until(lambda: fleet.rollout(rollout)["devices"].get("pending", 0) < 3, WAIT), (
        fleet.logs()
    )
    assert fleet.server is not None
    fleet.server.kill()
    killed_at = time.monotonic()
    fleet.start_server()
    # Until the killed process's session expires the broker hands it its share of the
    # device messages, which nobody reads (docs/server.md, Failure modes): reports sent
    # by then may be lost. Those sent after it must all arrive.
    assert wait_until(lambda: time.monotonic() > killed_at + SESSION_EXPIRY_S + 1, WAIT)
    lost_through = {device: fleet.agents[device].report_sequence() for device in devices}

    final = fleet.wait_for_state(rollout, {"completed", "paused", "aborted", "failed"})
    assert final["state"] == "completed", final
    listed = fleet.devices()
    for device in devices:
        assert listed[device]["model_version"] == "1.0.0", listed[device]
        fleet.account(fleet.agents[device], lost_through[device])
        assert [name.split("-")[0] for name in fleet.agents[device].installed()] == ["demo@1.0.0"]
