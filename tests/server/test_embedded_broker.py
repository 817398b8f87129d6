"""One machine, nothing else installed: `edgefleet server run --embedded-broker` on SQLite.

The server runs its own MQTT broker (rumqttd through iotcore) on --mqtt-port;
a real `edgefleet agent run` connects to it, enrolls itself over HTTP (open
enrollment), signs its reports, and installs a real signed bundle that a
rollout sends it. Killing the agent (SIGKILL: no goodbye) makes the broker
publish the agent's Last Will, and the device shows offline in
GET /api/v1/devices. Killing the broker's own process (SIGKILL) leaves no zombie:
the server restarts it, reconnects, and a device gets the fleet timestamp again.
A server killed (SIGKILL) with a directive queued in its broker for a device loses
the broker and its queue: started again, it sends the directive again when the
device connects, though the database still had the device online.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.mqtt import fleet_timestamp_topic
from edgefleet.server.db.migrate import open_database
from edgefleet.server.principals import Role
from edgefleet.server.settings import sqlite_url
from edgefleet.server.tokens import create_api_token
from edgefleet.trust import TrustRoot
from tests.agent.broker import Observer, free_port, unique_device_id
from tests.agent.power_loss_driver import Bundles, prepare_bundles
from tests.conftest import KeySet
from tests.server.serverproc import (
    ServerProcess,
    agent_log,
    json_of,
    start_agent,
    wait_until,
    write_server_keys,
)

WAIT = 30.0
ACCEPTED = "edgefleet_mqtt_messages_accepted_total"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("embedded-bundles"), keyset.release)


PLAN = {"stages": [{"percent": 100}], "gates": {"bake_s": 1}}


def start_server(
    tmp_path: Path, keys: tuple[Path, Path], mqtt_port: int, port: int | None = None
) -> ServerProcess:
    """`server run --embedded-broker` on SQLite in tmp_path/data, open enrollment (on the
    HTTP `port` of a server it restarts)."""
    return ServerProcess.start(
        tmp_path / "server.log", *keys,
        "--data", tmp_path / "data", "--embedded-broker", "--mqtt-port", str(mqtt_port),
        "--open-enrollment", port=port,
    )  # fmt: skip


def operator_token(tmp_path: Path) -> str:
    db = open_database(sqlite_url(tmp_path / "data"))  # the server's own SQLite file
    try:
        with db.session() as session:
            token, _ = create_api_token(session, "ops", Role.OPERATOR)
    finally:
        db.dispose()
    return token


def push(api: httpx.Client, bundle: Path) -> None:
    pushed = api.post(
        "/bundles",
        content=bundle.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    json_of(pushed, 201)


def listed(api: httpx.Client, device: str) -> dict[str, Any] | None:
    found: list[dict[str, Any]] = json_of(api.get("/devices"), 200)["items"]
    return next((d for d in found if d["id"] == device), None)


def rollout_state(api: httpx.Client, rollout: int) -> dict[str, Any]:
    status: dict[str, Any] = json_of(api.get(f"/rollouts/{rollout}"), 200)
    return status


def test_agent_on_the_embedded_broker_enrolls_installs_and_goes_offline(
    tmp_path: Path, releases: Bundles, keyset: KeySet, trust: TrustRoot
) -> None:
    keys = write_server_keys(tmp_path / "keys", trust, keyset)
    mqtt_port = free_port()
    server = start_server(tmp_path, keys, mqtt_port)
    agent: subprocess.Popen[bytes] | None = None
    device = unique_device_id("emb")
    try:
        server.wait_healthy()
        with server.api(operator_token(tmp_path)) as api:
            push(api, releases.releases[0])
            agent = start_agent(
                tmp_path, device, f"mqtt://127.0.0.1:{mqtt_port}", server.url, keys[0]
            )

            def online() -> bool:
                assert agent is not None and agent.poll() is None, agent_log(tmp_path, device)
                found = listed(api, device)
                return found is not None and found["online"] is True

            # Online needs a signed heartbeat (or the presence) through the embedded broker.
            assert wait_until(online, WAIT), (
                listed(api, device),
                server.log,
                agent_log(tmp_path, device),
            )
            started = {"bundle": "demo@1.0.0", "plan": PLAN}
            rollout = json_of(api.post("/rollouts", json=started), 201)["id"]

            def finished() -> bool:
                return rollout_state(api, rollout)["state"] in ("completed", "aborted")

            assert wait_until(finished, WAIT, interval=0.5), agent_log(tmp_path, device)
            status = rollout_state(api, rollout)
            assert status["state"] == "completed", status
            assert {k: n for k, n in status["devices"].items() if n} == {"succeeded": 1}, status
            assert wait_until(
                lambda: (listed(api, device) or {}).get("model_version") == "1.0.0", 10
            ), listed(api, device)

            # Every kind of device message gets through the embedded broker, telemetry and
            # heartbeats too.
            def accepted(kind: str) -> Callable[[], bool]:
                return lambda: server.metric(ACCEPTED, kind=kind) > 0

            for kind in ("heartbeat", "status", "telemetry"):
                assert wait_until(accepted(kind), 15), kind

            presence = server.metric(ACCEPTED, kind="presence")
            agent.kill()  # no DISCONNECT: the broker publishes the Last Will
            agent.wait(10)
            # Well before `offline_after` (120 s) could mark it: the Will did.
            assert wait_until(lambda: (listed(api, device) or {}).get("online") is False, 10), (
                listed(api, device)
            )
            assert server.metric(ACCEPTED, kind="presence") > presence
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        log = server.stop()
        assert "Traceback" not in log, log
    # SIGTERM (how systemd stops it) runs the whole shutdown: the last batch is written.
    assert server.process.returncode == 0, log
    assert "stopping" in log, log


def children(pid: int) -> dict[int, str]:
    """The child processes of `pid` (from any of its threads) and their states (Z: zombie)."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            stat = Path(f"/proc/{child}/stat").read_text()
            found[int(child)] = stat.rsplit(")", 1)[1].split()[0]
    return found


def test_a_killed_embedded_broker_is_reaped_restarted_and_the_fleet_timestamp_returns(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    mqtt_port = free_port()
    server = ServerProcess.start(
        tmp_path / "server.log", trust_path, key_path,
        "--data", tmp_path / "data", "--embedded-broker", "--mqtt-port", str(mqtt_port),
    )  # fmt: skip
    device: Observer | None = None
    try:
        server.wait_healthy()
        [broker_pid] = children(server.pid)
        topic = fleet_timestamp_topic()
        device = Observer(f"mqtt://127.0.0.1:{mqtt_port}", [topic])  # reconnects by itself
        assert device.wait_for(lambda: len(device.on(topic)) == 1), server.log
        first = device.on(topic)[0]

        os.kill(broker_pid, signal.SIGKILL)
        # Reaped (no <defunct> child), restarted, and the link back on the new broker.
        assert wait_until(lambda: broker_pid not in children(server.pid), WAIT), server.log

        def link_back() -> bool:
            health = httpx.get(f"{server.url}/api/v1/health", timeout=5).json()
            mqtt = health["mqtt"]
            return bool(mqtt["state"] == "connected" and mqtt["broker_restarts"] == 1)

        assert wait_until(link_back, WAIT), server.log
        assert wait_until(lambda: len(children(server.pid)) == 1, WAIT), children(server.pid)
        assert "Z" not in children(server.pid).values()
        # The restarted broker forgot every retained message: the server published a new
        # fleet timestamp on its reconnect, and the device (reconnected) receives it.
        assert device.wait_for(lambda: len(device.on(topic)) >= 2, WAIT), server.log
        assert device.on(topic)[-1] != first
        assert server.metric("edgefleet_embedded_broker_restarts_total") == 1
        assert server.metric("edgefleet_mqtt_link_losses_total") == 1
        assert server.metric("edgefleet_mqtt_link_up") == 1
    finally:
        if device is not None:
            device.close()
        log = server.stop()
    assert "Traceback" not in log, log
    assert log.count("ended unexpectedly") == 1, log
    assert server.process.returncode == 0, log


def test_a_directive_lost_with_a_killed_server_is_sent_again_when_the_device_reconnects(
    tmp_path: Path, releases: Bundles, keyset: KeySet, trust: TrustRoot
) -> None:
    keys = write_server_keys(tmp_path / "keys", trust, keyset)
    mqtt_port = free_port()
    server = start_server(tmp_path, keys, mqtt_port)
    device = unique_device_id("emb")
    agent: subprocess.Popen[bytes] | None = None
    try:
        server.wait_healthy()
        token = operator_token(tmp_path)
        with server.api(token) as api:
            push(api, releases.releases[0])
            agent = start_agent(
                tmp_path, device, f"mqtt://127.0.0.1:{mqtt_port}", server.url, keys[0]
            )
            assert wait_until(lambda: (listed(api, device) or {}).get("online") is True, WAIT)
            agent.send_signal(signal.SIGSTOP)  # connected, but takes nothing from the broker
            started = {"bundle": "demo@1.0.0", "plan": PLAN}
            rollout = json_of(api.post("/rollouts", json=started), 201)["id"]
            assert wait_until(
                lambda: rollout_state(api, rollout)["devices"]["notified"] == 1, WAIT
            ), rollout_state(api, rollout)
        # The directive waits in the broker's queue for the device; the broker dies with
        # the server, and no Last Will tells the database the device went away.
        server.kill()
        server = start_server(tmp_path, keys, mqtt_port, port=server.port)
        server.wait_healthy()
        agent.send_signal(signal.SIGCONT)  # it finds its connection gone and connects again
        with server.api(token) as api:

            def finished() -> bool:
                return rollout_state(api, rollout)["state"] in ("completed", "aborted")

            assert wait_until(finished, WAIT, interval=0.5), (
                rollout_state(api, rollout),
                server.log,
                agent_log(tmp_path, device),
            )
            status = rollout_state(api, rollout)
            assert status["state"] == "completed", status
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGCONT)
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        log = server.stop()
    assert "Traceback" not in log, log
