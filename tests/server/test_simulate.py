"""`edgefleet simulate` against `edgefleet server run` and a real mosquitto.

Fifty simulated devices (one process, one network loop) enroll with a claim,
come online and beat; a 2-stage rollout completes on them, each device
downloading the bundle from the directive's HTTP source and verifying it. With
`--fail-rate 1` every install fails after its download and the first stage's
gate pauses the rollout. Ctrl-C (SIGINT) ends the run cleanly: every device
says `offline-clean` and a summary line is printed.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import func, select

from edgefleet.server.db.database import Database
from edgefleet.server.db.models import TelemetryBucket
from edgefleet.server.principals import Role
from edgefleet.server.tokens import create_api_token
from edgefleet.simulate.network import Simulation, SimulationSettings
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip
from tests.conftest import KeySet
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys
from tests.server.test_replicas import build_release

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    server: ServerProcess
    broker: MosquittoBroker
    token: str
    trust_path: Path
    keyset: KeySet
    tmp_path: Path

    def api(self) -> Any:
        return self.server.api(self.token)

    def claim(self, uses: int) -> str:
        with self.api() as api:
            made = api.post("/enroll-tokens", json={"max_uses": uses, "tags": {"fleet": "sim"}})
            return str(json_of(made, 201)["token"])

    def simulate(self, devices: int, *extra: str) -> subprocess.Popen[str]:
        command = [
            sys.executable, "-m", "edgefleet", "simulate", "--devices", str(devices),
            "--server", self.server.url, "--mqtt", self.broker.url,
            "--trust", str(self.trust_path), "--enroll-token", self.claim(devices),
            "--heartbeat-seconds", "2", "--telemetry-seconds", "5", *extra,
        ]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def online(self) -> int:
        with self.api() as api:
            return int(json_of(api.get("/devices", params={"online": True}), 200)["total"])

    def rollout(self, version: str, plan: dict[str, Any]) -> int:
        release = build_release(self.tmp_path / "bundles", self.keyset, version)
        with self.api() as api:
            pushed = api.post(
                "/bundles",
                content=release.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            json_of(pushed, 201)
            started = api.post("/rollouts", json={"bundle": f"demo@{version}", "plan": plan})
            return int(json_of(started, 201)["id"])

    def state(self, rollout: int) -> Any:
        with self.api() as api:
            return json_of(api.get(f"/rollouts/{rollout}"), 200)


@pytest.fixture
def fleet(tmp_path: Path, keyset: KeySet, trust: TrustRoot) -> Iterator[Fleet]:
    mosquitto_or_skip()
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    db_url = f"sqlite:///{tmp_path / 'server.db'}"
    with MosquittoBroker.running(tmp_path / "broker") as broker:
        server = ServerProcess.start(
            tmp_path / "server.log", trust_path, key_path,
            "--db", db_url, "--mqtt", broker.url, "--data", tmp_path / "data",
        )  # fmt: skip
        try:
            server.wait_healthy()
            db = Database(db_url)
            try:
                with db.session() as session:
                    token, _ = create_api_token(session, "ops", Role.OPERATOR)
            finally:
                db.dispose()
            yield Fleet(server, broker, token, trust_path, keyset, tmp_path)
        finally:
            log = server.stop()
            assert "Traceback" not in log, log


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Ctrl-C, as a user stops it; the exit status, stdout and stderr."""
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_fifty_simulated_devices_enroll_and_a_two_stage_rollout_completes(fleet: Fleet) -> None:
    process = fleet.simulate(50)
    try:
        assert wait_until(lambda: fleet.online() == 50, 90), fleet.server.log
        plan = {"stages": [{"percent": 20}, {"percent": 100}], "gates": {"bake_s": 1}}
        rollout = fleet.rollout("1.0.0", plan)
        assert wait_until(lambda: fleet.state(rollout)["state"] == "completed", 120), fleet.state(
            rollout
        )
        with fleet.api() as api:
            devices = json_of(api.get("/devices", params={"limit": 100}), 200)["items"]
        assert {(d["model_name"], d["model_version"]) for d in devices} == {("demo", "1.0.0")}
    finally:
        status, out, err = stop(process)
    assert status == 0, err
    assert "50 enrolled" in out and "50 installs committed, 0 failed" in out, out
    assert "Traceback" not in err, err
    assert wait_until(lambda: fleet.online() == 0, 30)  # each said offline on the way out


def test_installs_failing_at_fail_rate_one_pause_the_rollout(fleet: Fleet) -> None:
    process = fleet.simulate(10, "--fail-rate", "1")
    try:
        assert wait_until(lambda: fleet.online() == 10, 90), fleet.server.log
        plan = {
            "stages": [{"percent": 50}, {"percent": 100}],
            "gates": {"bake_s": 1},
            "max_retries": 0,
            "on_gate_failure": "pause",
        }
        rollout = fleet.rollout("1.0.0", plan)
        assert wait_until(lambda: fleet.state(rollout)["state"] == "paused", 120), fleet.state(
            rollout
        )
        assert fleet.state(rollout)["devices"].get("failed") == 5
    finally:
        status, out, err = stop(process)
    assert status == 0, err
    assert "0 installs committed, 5 failed" in out, out


def test_devices_serving_from_the_start_send_telemetry_before_any_rollout(fleet: Fleet) -> None:
    process = fleet.simulate(5, "--serving", "digits@0.9.0", "--telemetry-seconds", "1")
    db = Database(f"sqlite:///{fleet.tmp_path / 'server.db'}")

    def stored_windows() -> int:
        with db.session() as session:
            return int(session.scalar(select(func.sum(TelemetryBucket.windows))) or 0)

    try:
        assert wait_until(lambda: stored_windows() >= 10, 90), fleet.server.log
        with fleet.api() as api:
            devices = json_of(api.get("/devices", params={"limit": 10}), 200)["items"]
        assert {(d["model_name"], d["model_version"]) for d in devices} == {("digits", "0.9.0")}
    finally:
        status, _, err = stop(process)
        db.dispose()
    assert status == 0, err


def test_serving_that_is_not_name_at_version_is_a_usage_error(fleet: Fleet) -> None:
    process = fleet.simulate(1, "--serving", "digits")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().splitlines() == [
        "error [usage]: --serving 'digits' is not NAME@VERSION (e.g. digits@1.0.0)"
    ]


class EnrollRecorder(http.server.BaseHTTPRequestHandler):
    """Answers every enrollment 201 and records who it was forwarded for."""

    forwarded: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.forwarded.append(self.headers.get("X-Forwarded-For"))
        body = json.dumps({}).encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("forwarded_for", [True, False])
def test_forwarded_for_gives_each_device_an_address_of_its_own(
    trust: TrustRoot, forwarded_for: bool
) -> None:
    EnrollRecorder.forwarded = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EnrollRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = SimulationSettings(
        devices=20,
        server_url=f"http://127.0.0.1:{server.server_address[1]}",
        broker_url="mqtt://127.0.0.1:1",
        trust=trust,
        forwarded_for=forwarded_for,
    )
    simulation = Simulation(settings)
    try:
        simulation.enroll()
    finally:
        simulation.close()
        server.shutdown()
        server.server_close()
    addresses = EnrollRecorder.forwarded
    assert len(addresses) == 20
    if forwarded_for:
        assert len(set(addresses)) == 20
        assert all(a is not None and a.startswith("10.") for a in addresses)
    else:
        assert addresses == [None] * 20
