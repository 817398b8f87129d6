"""mosquitto restarted while the devices install: the rollout still completes.

Three agents on one broker; a two-stage rollout of demo@1.0.0; the broker is
stopped as soon as a device was sent its directive and started again on the
same port and database. The agents and the server reconnect by themselves;
the rollout completes, every status report is stored once, and every device
installed 1.0.0 once.
"""

from __future__ import annotations

from tests.faults.conftest import WAIT, FaultFleet
from tests.server.serverproc import wait_until


def test_a_broker_restart_mid_rollout_loses_no_report_and_installs_once(
    fleet: FaultFleet,
) -> None:
    devices = [f"brk-{index}" for index in range(3)]
    for device in devices:
        fleet.add_agent(device)
    assert wait_until(lambda: fleet.online(devices), WAIT), fleet.logs()

    rollout = fleet.start_rollout("1.0.0", [{"percent": 34}, {"percent": 100}])
    assert wait_until(
        lambda: (
            sum(fleet.rollout(rollout)["devices"].values()) > 0
            and fleet.rollout(rollout)["devices"].get("pending", 0) < 3
        ),
        WAIT,
    ), fleet.logs()
    fleet.broker.restart()

    final = fleet.wait_for_state(rollout, {"completed", "paused", "aborted", "failed"})
    assert final["state"] == "completed", final
    for device in devices:
        reports = fleet.account(fleet.agents[device])
        assert reports[-1]["install_state"] == "committed", reports
        assert reports[-1]["bundle_version"] == "1.0.0", reports
