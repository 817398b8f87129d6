"""The fleet as operators run it: `edgefleet server run`, real agents, a real mosquitto.

One server process (SQLite, open enrollment) and three `edgefleet agent run`
processes on one broker. The agents enroll themselves and sign every report;
the operator pushes two signed bundles with the CLI, rolls 1.0.0 out with the
smallest plan (`{percent: 34}, {percent: 100}`) and watches it complete, then
starts 1.1.0, aborts it after the canary stage, and sees the canary rolled
back to 1.0.0 while the others never left it. Then a hotfix 1.0.1, numbered
between the rolled-back and the aborted release and stating the security floor
1.0.1, rolls out to every device, the canary included (an abort never leaves a
floor behind); the devices report the floor, and the server refuses to roll
1.0.0 out again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.keys import save_private_key
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, free_port, mosquitto_or_skip, unique_device_id
from tests.agent.power_loss_driver import Bundles, prepare_bundles
from tests.conftest import KeySet
from tests.server.serverproc import agent_log, start_agent

WAIT = 90.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen[Any]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("e2e-bundles"), keyset.release)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


def test_rollout_to_real_agents_completes_then_abort_rolls_back(
    tmp_path: Path, broker: MosquittoBroker, releases: Bundles, keyset: KeySet, trust: TrustRoot
) -> None:
    trust_path = tmp_path / "trust.json"
    trust_path.write_bytes(trust.raw)
    save_private_key(tmp_path / "server.key", keyset.server)
    data = tmp_path / "data"
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet", "server", "run",
            "--data", str(data), "--mqtt", broker.url, "--port", str(port),
            "--open-enrollment", "--trust", str(trust_path),
            "--server-key", str(tmp_path / "server.key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    agents: list[subprocess.Popen[bytes]] = []
    try:

        def health() -> bool:
            assert server.poll() is None, stop(server)
            try:
                with urllib.request.urlopen(f"{server_url}/api/v1/health", timeout=2):
                    return True
            except OSError:
                return False

        assert wait_until(health), stop(server)  # it has created its database
        token = cli("server", "token", "create", "--role", "operator", "--name", "ops",
                    "--data", data).stdout.strip()  # fmt: skip
        env = {"EDGEFLEET_SERVER": server_url, "EDGEFLEET_TOKEN": token}
        for release in releases.releases[:2]:
            cli("bundles", "push", release, env=env)

        devices = [unique_device_id(f"e2e{i}") for i in range(3)]
        agents = [start_agent(tmp_path, d, broker.url, server_url, trust_path) for d in devices]

        def fleet() -> dict[str, dict[str, Any]]:
            listed = get_json(f"{server_url}/api/v1/devices", token)
            return {item["id"]: item for item in listed["items"]}

        def all_online() -> bool:
            return set(fleet()) == set(devices) and all(d["online"] for d in fleet().values())

        assert wait_until(all_online), [agent_log(tmp_path, d) for d in devices]

        plan = tmp_path / "plan.yaml"
        plan.write_text("stages: [{percent: 34}, {percent: 100}]\ngates: {bake_s: 1}\n")
        started = json.loads(
            cli(
                "rollout", "start", "--bundle", "demo@1.0.0", "--plan", plan, "--json", env=env
            ).stdout
        )
        first = started["id"]
        watched = cli("rollout", "status", str(first), "--watch", "--interval", "1", env=env)
        assert "completed" in watched.stdout
        assert wait_until(lambda: all(d["model_version"] == "1.0.0" for d in fleet().values())), (
            fleet()
        )

        status = get_json(f"{server_url}/api/v1/rollouts/{first}", token)
        assert [t["to_state"] for t in status["transitions"]][-1] == "completed"

        # 1.1.0 to the canary stage only: abort once the canary runs it.
        plan.write_text("stages: [{count: 1}, {percent: 100}]\ngates: {bake_s: 3600}\n")
        second = json.loads(
            cli(
                "rollout", "start", "--bundle", "demo@1.1.0", "--plan", plan, "--json", env=env
            ).stdout
        )["id"]
        assert wait_until(
            lambda: sum(d["model_version"] == "1.1.0" for d in fleet().values()) == 1
        ), fleet()
        canary = next(i for i, d in fleet().items() if d["model_version"] == "1.1.0")
        cli("rollout", "abort", str(second), "--reason", "e2e abort", env=env)
        assert wait_until(
            lambda: get_json(f"{server_url}/api/v1/rollouts/{second}", token)["state"] == "aborted"
        )
        assert wait_until(lambda: fleet()[canary]["model_version"] == "1.0.0"), fleet()
        assert all(d["model_version"] == "1.0.0" for d in fleet().values())

        # The hotfix: between 1.0.0 (rolled back to) and 1.1.0 (aborted), for every device.
        save_private_key(tmp_path / "release.key", keyset.release)
        hotfix = tmp_path / "demo-1.0.1.efb"
        cli("bundle", "build", releases.model_dir, "--name", "demo", "--version", "1.0.1",
            "--key", tmp_path / "release.key", "--security-floor", "1.0.1",
            "-o", hotfix)  # fmt: skip
        cli("bundles", "push", hotfix, env=env)
        plan.write_text("stages: [{percent: 34}, {percent: 100}]\ngates: {bake_s: 1}\n")
        third = json.loads(
            cli(
                "rollout", "start", "--bundle", "demo@1.0.1", "--plan", plan, "--json", env=env
            ).stdout
        )["id"]
        watched = cli("rollout", "status", str(third), "--watch", "--interval", "1", env=env)
        assert "completed" in watched.stdout
        assert wait_until(lambda: all(d["model_version"] == "1.0.1" for d in fleet().values())), (
            fleet()
        )
        floor = {"demo": 1_000_000_000_001}  # 1.0.1 as a release counter
        assert wait_until(lambda: all(d["security_floors"] == floor for d in fleet().values())), (
            fleet()
        )
        again = subprocess.run(
            [sys.executable, "-m", "edgefleet", "rollout", "start", "--bundle", "demo@1.0.0",
             "--plan", str(plan)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert again.returncode == 1, again
        assert again.stderr.startswith(
            "refused [conflict]: 3 selected device(s) have a security floor for demo above "
            "demo@1.0.0 (release counter 1000000000000)"
        ), again.stderr
        assert again.stderr.count("\n") == 1, again.stderr

        admin = cli("server", "token", "create", "--role", "admin", "--name", "root",
                    "--data", data).stdout.strip()  # fmt: skip
        audit = get_json(f"{server_url}/api/v1/audit", admin)
        done = {(e["actor"], e["action"], e["target"]) for e in audit}
        assert ("ops", "bundle.push", "demo@1.1.0") in done, done
        assert ("ops", "rollout.start", f"rollout {first}") in done, done
        assert ("ops", "rollout.abort", f"rollout {second}") in done, done
    finally:
        for agent in agents:
            stop(agent)
        log = stop(server)
        assert "Traceback" not in log, log
