"""Drift end to end: a converted bundle, a real server, two real agents, one fed shifted inputs.

The server is `run_server` with lab timings (tests/server/labserver.py: the
same storage, broker link, workers and API, windows of seconds instead of
minutes); the agents are `edgefleet agent run` processes on a real mosquitto;
the bundles are the digits MLP converted and signed by the real converter,
carrying the drift reference and thresholds it calibrated. Traffic goes to
each agent's local API as the device's application would send it: held-out
digits to one device, the same digits brightened to the other.

What must come of it: an alert for the shifted device only, seen through the
API, the CLI and a signed webhook; then a rollout whose canary drifts is paused
by its drift gate.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgefleet.agent.config import load_config
from edgefleet.keys import save_private_key
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, free_port, mosquitto_or_skip, unique_device_id
from tests.agent.power_loss_driver import Bundles, prepare_bundles
from tests.conftest import KeySet
from tests.fixtures import datasets
from tests.server.labserver import write_settings
from tests.server.serverproc import agent_log, start_agent, wait_until
from tests.server.webhookreceiver import Receiver, running_receiver

SECRET = "drift-webhook-secret"
WAIT = 120.0
BRIGHTER = 0.3  # added to every pixel (in [0, 1]): a shift no calm window shows
BATCH = 100


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("drift-e2e-bundles"), keyset.release)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


class Traffic:
    """Sends batches of digits to each agent's local API until stopped; `shifted` brightens."""

    def __init__(self, ports: dict[str, int]) -> None:
        features, _ = datasets.digits_tabular()
        self.rows = features[datasets.split(len(features)).validation].astype(np.float32)
        self.ports = ports
        self.shifted: set[str] = set()
        self.sent = dict.fromkeys(ports, 0)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rng = np.random.default_rng(0)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _batch(self, device: str) -> bytes:
        rows = self.rows[self._rng.integers(0, len(self.rows), BATCH)]
        if device in self.shifted:
            rows = np.clip(rows + BRIGHTER, 0.0, 1.0).astype(np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, features=rows)
        return buffer.getvalue()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(0.25):
                for device, port in self.ports.items():
                    try:
                        response = client.post(
                            f"http://127.0.0.1:{port}/v1/predict/batch",
                            content=self._batch(device),
                            headers={"Content-Type": "application/octet-stream"},
                        )
                    except httpx.HTTPError as exc:  # an agent restarting its model: retried
                        self.failures.append(f"{device}: {exc}")
                        continue
                    if response.status_code == 200:
                        self.sent[device] += BATCH
                    else:
                        self.failures.append(f"{device}: {response.status_code} {response.text}")


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def test_drift_alerts_the_shifted_device_only_and_its_gate_pauses_a_rollout(
    tmp_path: Path,
    broker: MosquittoBroker,
    receiver: Receiver,
    releases: Bundles,
    keyset: KeySet,
    trust: TrustRoot,
) -> None:
    trust_path = tmp_path / "trust.json"
    trust_path.write_bytes(trust.raw)
    save_private_key(tmp_path / "server.key", keyset.server)
    data = tmp_path / "data"
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    settings = write_settings(
        tmp_path / "server.json",
        data_dir=data,
        trust_path=trust_path,
        server_key_path=tmp_path / "server.key",
        mqtt_url=broker.url,
        port=port,
        webhook_url=receiver.url,
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.server.labserver", str(settings)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LAB_WEBHOOK_SECRET": SECRET},
        )
    agents: list[subprocess.Popen[bytes]] = []
    api = httpx.Client(base_url=f"{server_url}/api/v1", timeout=30)

    def server_log() -> str:
        return log_path.read_text(errors="replace")

    def healthy() -> bool:
        assert server.poll() is None, server_log()
        try:
            return api.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, 60), server_log()
        token = cli({}, "server", "token", "create", "--role", "operator", "--name", "ops",
                    "--data", data).stdout.strip()  # fmt: skip
        api.headers["Authorization"] = f"Bearer {token}"
        env = {"EDGEFLEET_SERVER": server_url, "EDGEFLEET_TOKEN": token}
        for release in releases.releases[:2]:
            cli(env, "bundles", "push", release)

        shifted, calm = unique_device_id("drift-a"), unique_device_id("drift-b")
        devices = [shifted, calm]
        agents = [start_agent(tmp_path, d, broker.url, server_url, trust_path) for d in devices]
        ports = {d: load_config(tmp_path / f"{d}.toml").local_api.port for d in devices}

        def fleet() -> dict[str, dict[str, Any]]:
            return {item["id"]: item for item in api.get("/devices").json()["items"]}

        def alerts(**query: str) -> list[dict[str, Any]]:
            response = api.get("/alerts", params={"open": "true", **query})
            assert response.status_code == 200, response.text
            return list(response.json())

        def all_online() -> bool:
            return len(fleet()) == 2 and all(d["online"] for d in fleet().values())

        assert wait_until(all_online, WAIT), [agent_log(tmp_path, d) for d in devices]
        plan = tmp_path / "plan.yaml"
        plan.write_text("stages: [{percent: 100}]\ngates: {bake_s: 1}\n")
        first = json.loads(cli(env, "rollout", "start", "--bundle", "demo@1.0.0",
                               "--plan", plan, "--json").stdout)["id"]  # fmt: skip
        cli(env, "rollout", "status", str(first), "--watch", "--interval", "1")
        assert wait_until(
            lambda: all(d["model_version"] == "1.0.0" for d in fleet().values()), WAIT
        ), fleet()

        with Traffic(ports) as traffic:
            traffic.shifted.add(shifted)

            def device_alerts(device: str) -> list[dict[str, Any]]:
                return [a for a in alerts(device=device) if a["bundle_version"] == "1.0.0"]

            assert wait_until(lambda: bool(device_alerts(shifted)), WAIT), (
                traffic.sent, traffic.failures[-5:], server_log()[-4000:]
            )  # fmt: skip
            opened = device_alerts(shifted)
            assert {a["kind"] for a in opened} >= {"dataset-drift"}, opened
            assert all(a["scope"] == "device" for a in opened), opened
            # The calm device was judged all along (windows of the same size) and stays calm.
            assert traffic.sent[calm] >= traffic.sent[shifted] - 4 * BATCH, traffic.sent
            assert device_alerts(calm) == [], device_alerts(calm)

            listed = cli(env, "alerts", "list", "--device", shifted, "--open", "--json")
            assert {a["id"] for a in json.loads(listed.stdout)} == {a["id"] for a in opened}

            def delivered() -> set[int]:
                return {
                    r.payload["alert"]["id"]
                    for r in receiver.requests
                    if r.payload["event"] == "alert.opened"
                }

            assert wait_until(lambda: {a["id"] for a in opened} <= delivered(), WAIT), (
                receiver.requests, server_log()[-4000:]
            )  # fmt: skip
            for request in receiver.requests:
                timestamp = request.headers["X-Edgefleet-Timestamp"]
                expected = hmac.new(
                    SECRET.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256
                ).hexdigest()
                assert request.headers["X-Edgefleet-Signature"] == f"sha256={expected}"
                assert request.payload["alert"]["device_id"] != calm, request.payload

            # 1.1.0 to one canary, with a drift gate that pauses: the canary's inputs shift.
            # The latency gate is left wide: on a loaded machine the canary's p95 against the
            # previous version's is noise, and this stage must fail on drift alone.
            traffic.shifted.clear()
            plan.write_text(
                "stages: [{count: 1}, {percent: 100}]\n"
                "on_gate_failure: pause\n"
                "gates: {bake_s: 3600, max_drift: 0, max_latency_p95_ratio: 1000}\n"
            )
            second = json.loads(cli(env, "rollout", "start", "--bundle", "demo@1.1.0",
                                    "--plan", plan, "--json").stdout)["id"]  # fmt: skip
            assert wait_until(
                lambda: any(d["model_version"] == "1.1.0" for d in fleet().values()), WAIT
            ), fleet()
            canary = next(i for i, d in fleet().items() if d["model_version"] == "1.1.0")
            traffic.shifted.add(canary)

            def rollout() -> dict[str, Any]:
                return dict(api.get(f"/rollouts/{second}").json())

            # A string, which pytest prints whole: the stage's gate checks say why it runs on.
            assert wait_until(lambda: rollout()["state"] == "paused", WAIT), (
                f"canary {canary}\nrollout {json.dumps(rollout(), indent=1)}\n"
                f"alerts {json.dumps(alerts(), indent=1)}\nserver log {server_log()[-4000:]}"
            )
            reason = rollout()["reason"] or ""
            assert "max_drift" in reason and canary in reason, rollout()
            other = next(d for d in devices if d != canary)
            assert fleet()[other]["model_version"] == "1.0.0", fleet()
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(30)
        api.close()
        if server.poll() is None:
            server.terminate()
            server.wait(30)
        assert "Traceback" not in server_log(), server_log()
