"""A server killed right after a device committed: the rollout completes from its heartbeat.

`edgefleet server run` on SQLite and mosquitto, one simulated device that
signs every message (`FleetSimulator`, answering directives by hand). The
device accepts its install directive; the server is killed with SIGKILL; the
device commits while the server is down and its `committed` report is lost
(never sent, as if dropped from its outbox). After a restart its next
heartbeat restates what it serves, and the rollout completes once the killed
replica's lease expired (15 s), not after `device_timeout_s` (30 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.server.tokens import create_api_token
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip
from tests.conftest import PROFILE, KeySet
from tests.server.fleet import FleetSimulator, make_devices
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys
from tests.server.test_replicas import build_release, installs_of

LEASE_TTL_S = 15  # the server's default `lease_ttl`: the restarted replica waits it out
DEVICE_TIMEOUT_S = 1800  # the plan's default `device_timeout_s`


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


def test_a_committed_report_lost_with_the_server_is_settled_after_restart(
    tmp_path: Path, broker: MosquittoBroker, keyset: KeySet, trust: TrustRoot
) -> None:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    db_url = f"sqlite:///{tmp_path / 'server.db'}"
    args = ("--db", db_url, "--mqtt", broker.url, "--data", tmp_path / "data", "--open-enrollment")

    def start(name: str) -> ServerProcess:
        server = ServerProcess.start(tmp_path / f"{name}.log", trust_path, key_path, *args)
        server.wait_healthy()
        return server

    first = start("first")
    second: ServerProcess | None = None
    fleet: FleetSimulator | None = None
    try:
        db = Database(db_url)
        try:
            with db.session() as session:
                token, _ = create_api_token(session, "ops", Role.OPERATOR)
        finally:
            db.dispose()
        (device,) = make_devices(1, "settle")
        with first.api() as api:
            body = {
                "device_id": device.id,
                "public_key": device.public_key,
                "profile": PROFILE,
                "arch": "x86_64",
                "runtimes": ["onnxruntime"],
                "agent_version": "1.0.0",
                "tags": {},
            }
            json_of(api.post("/devices/enroll", json=body), 201)
        release = build_release(tmp_path / "bundles", keyset, "1.0.0")
        with first.api(token) as api:
            pushed = api.post(
                "/bundles",
                content=release.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            json_of(pushed, 201)
            plan = {"stages": [{"percent": 100}], "gates": {"bake_s": 1}}
            started = {"bundle": "demo@1.0.0", "plan": plan}
            rollout = json_of(api.post("/rollouts", json=started), 201)["id"]

        fleet = FleetSimulator(broker.url, [device], trust=trust, answer_directives=False)
        fleet.presence(device.id, True)  # connected, as an agent says: now it is notified
        assert fleet.wait_for(lambda: installs_of(fleet, device, "1.0.0") == 1, 30), first.log
        (directive,) = fleet.directives_for(device.id)
        fleet.status(
            device.id,
            "downloading",
            bundle_name="demo",
            bundle_version="1.0.0",
            directive_sequence=directive.sequence,
        )

        def reported(server: ServerProcess, state: str) -> bool:
            with server.api(token) as api:
                found = json_of(api.get(f"/rollouts/{rollout}"), 200)
            return bool(found["devices"].get(state) == 1)

        assert wait_until(lambda: reported(first, "installing"), 15), first.log
        first.kill()
        # While the server is down the device commits; its report is lost.
        device.model_name, device.model_version = "demo", "1.0.0"

        restarted_at = time.monotonic()
        second = start("second")

        def completed() -> bool:
            # Committed, serving demo@1.0.0; beating on, as an agent does: mosquitto may
            # hand one to the killed replica's session until that session expires.
            fleet.heartbeat(device.id)
            assert second is not None
            with second.api(token) as api:
                found = json_of(api.get(f"/rollouts/{rollout}"), 200)
            return bool(found["state"] == "completed")

        assert wait_until(completed, LEASE_TTL_S + 30, interval=0.5), second.log
        took = time.monotonic() - restarted_at
        assert took < DEVICE_TIMEOUT_S / 10, took
        assert installs_of(fleet, device, "1.0.0") == 1  # the device installed once
        assert all(error == "ReplayedDirectiveError" for _, error in fleet.refused)
    finally:
        if fleet is not None:
            fleet.close()
        first.stop()
        if second is not None:
            log = second.stop()
            assert "Traceback" not in log, log
