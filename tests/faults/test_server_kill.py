"""The server killed with SIGKILL mid-rollout and started again: the rollout completes.

Three agents; a two-stage rollout of demo@1.0.0; the server is killed (no
clean-up, no MQTT DISCONNECT) as soon as a device was sent its directive, and a
new server process starts on the same port, database and replica name (the
host's). It resumes the killed process's MQTT session, which the broker kept
and queued the device messages for meanwhile, waits out the killed one's
lease (15 s), settles what the devices did meanwhile and sends unanswered
directives again. The rollout completes, every device installed 1.0.0 once,
and every status report the agents sent is stored exactly once: none lost to
the killed process's session.
"""

from __future__ import annotations

from tests.faults.conftest import WAIT, FaultFleet
from tests.server.serverproc import wait_until


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
    fleet.start_server()

    final = fleet.wait_for_state(rollout, {"completed", "paused", "aborted", "failed"})
    assert final["state"] == "completed", final
    listed = fleet.devices()
    for device in devices:
        assert listed[device]["model_version"] == "1.0.0", listed[device]
        fleet.account(fleet.agents[device])
        assert [name.split("-")[0] for name in fleet.agents[device].installed()] == ["demo@1.0.0"]
