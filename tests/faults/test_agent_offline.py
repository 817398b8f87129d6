"""An agent stopped through a whole stage catches up when it returns.

Three agents; one is stopped (SIGTERM, as systemd stops it) and marked offline
before a two-stage rollout of demo@1.0.0 starts. Whichever stage holds the
third, that stage waits for it alone, naming it offline, while it is away.
Started again, the third is sent its directive, installs once, and the rollout
completes; every status report is stored once.
"""

from __future__ import annotations

from tests.faults.conftest import WAIT, FaultFleet
from tests.server.serverproc import wait_until


def test_an_agent_away_through_a_stage_catches_up_when_it_returns(fleet: FaultFleet) -> None:
    devices = [f"off-{index}" for index in range(3)]
    for device in devices:
        fleet.add_agent(device)
    assert wait_until(lambda: fleet.online(devices), WAIT), fleet.logs()
    away = fleet.agents[devices[2]]
    away.stop()
    assert wait_until(lambda: not fleet.devices()[away.device_id]["online"], WAIT), fleet.logs()

    rollout = fleet.start_rollout("1.0.0", [{"percent": 34}, {"percent": 100}])

    def stage_waits_for_the_away_device() -> bool:
        found = fleet.rollout(rollout)
        stage = found["stages"][found["stage_index"]]
        return (
            found["state"] == "running"
            and stage["states"]["succeeded"] == stage["assigned"] - 1
            and any("1 offline" in reason for reason in stage["reasons"])
        )

    # Whichever stage holds it (the canary or the last), that stage waits for it alone.
    assert wait_until(stage_waits_for_the_away_device, WAIT), fleet.logs()
    assert fleet.devices()[away.device_id]["model_version"] is None

    away.start()
    final = fleet.wait_for_state(rollout, {"completed", "paused", "aborted", "failed"})
    assert final["state"] == "completed", final
    assert fleet.devices()[away.device_id]["model_version"] == "1.0.0"
    for device in devices:
        fleet.account(fleet.agents[device])
