"""A device whose disk has no room for the next bundle: the install fails, it keeps serving.

One agent installs demo@1.0.0. It is then restarted with a disk reserve larger
than any free space (`limits.disk_reserve_bytes`, what an almost full disk looks
like to it), and demo@1.1.0 rolled out to it. Every attempt fails before a byte
is written, with the reason (`not enough disk: ...`); with no retries in its
plan the rollout pauses, its reason the failure gate; nothing of 1.1.0 is left
on the device (no download, no `versions/` entry) and it still serves 1.0.0.
"""

from __future__ import annotations

import json
import urllib.request

from edgefleet.agent.client import running_agent
from edgefleet.agentconfig import Limits
from tests.faults.conftest import WAIT, FaultFleet
from tests.server.serverproc import wait_until

ALL_OF_IT = 1 << 60  # bytes: more than any disk holds


def test_a_full_disk_fails_the_install_with_its_reason_and_keeps_serving(
    fleet: FaultFleet,
) -> None:
    agent = fleet.add_agent("disk-0")
    assert wait_until(lambda: fleet.online([agent.device_id]), WAIT), fleet.logs()
    first = fleet.start_rollout("1.0.0", [{"percent": 100}])
    assert fleet.wait_for_state(first, {"completed", "paused", "aborted"})["state"] == "completed"

    agent.stop()
    fleet.add_agent(agent.device_id, limits=Limits(disk_reserve_bytes=ALL_OF_IT))
    assert wait_until(lambda: fleet.online([agent.device_id]), WAIT), fleet.logs()
    second = fleet.start_rollout(
        "1.1.0", [{"percent": 100}], max_retries=0, on_gate_failure="pause"
    )
    final = fleet.wait_for_state(second, {"completed", "paused", "aborted"})
    assert final["state"] == "paused", final
    assert "max_failure_share" in final["reason"], final

    reports = fleet.account(agent)
    failed = [r for r in reports if r["install_state"] == "failed"]
    assert failed and all("not enough disk" in (r["reason"] or "") for r in failed), reports
    assert [name.split("-")[0] for name in agent.installed()] == ["demo@1.0.0"]
    assert list(agent.layout.downloads.iterdir()) == []
    assert fleet.devices()[agent.device_id]["model_version"] == "1.0.0"
    running = running_agent(agent.layout)
    assert running is not None and running.url is not None
    with urllib.request.urlopen(f"{running.url}/v1/model", timeout=10) as response:
        assert json.loads(response.read())["current"]["version"] == "1.0.0"
