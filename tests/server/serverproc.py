"""`edgefleet server run` as a child process, for the tests that need the real command.

`ServerProcess.start(...)` runs one replica (its log in a file, so a chatty
server never blocks on a full pipe), `wait_healthy` polls GET /api/v1/health,
`metrics()` reads its Prometheus counters, `kill()` is SIGKILL (a crash) and
`stop()` SIGTERM (a clean shutdown, whose log must hold no traceback).
Each replica's id (`host-pid-random`, see `default_replica_id`) carries the
process id, so a lease owner names the process that holds it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.config import write_config
from edgefleet.agentconfig import (
    AgentConfig,
    HealthSettings,
    LocalApiSettings,
    MqttSettings,
    TelemetrySettings,
)
from edgefleet.keys import save_private_key
from edgefleet.trust import TrustRoot
from edgefleet.wire import API_PREFIX as API
from tests.agent.broker import free_port
from tests.agent.power_loss_driver import PROFILE
from tests.conftest import KeySet


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_server_keys(directory: Path, trust: TrustRoot, keyset: KeySet) -> tuple[Path, Path]:
    """trust.json and server.key in `directory`, as `edgefleet server run` takes them."""
    directory.mkdir(parents=True, exist_ok=True)
    trust_path = directory / "trust.json"
    trust_path.write_bytes(trust.raw)
    key_path = directory / "server.key"
    save_private_key(key_path, keyset.server)
    return trust_path, key_path


@dataclass
class ServerProcess:
    """One `edgefleet server run` process and its HTTP API."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls,
        log_path: Path,
        trust_path: Path,
        key_path: Path,
        *args: str | Path,
        port: int | None = None,
    ) -> ServerProcess:
        """Start a replica with `args` (--data, --db, --mqtt, ...) on `port` (a restart keeps
        its predecessor's), else on a free HTTP port."""
        port = port or free_port()
        command = [
            sys.executable, "-m", "edgefleet", "server", "run", "--port", str(port),
            "--trust", str(trust_path), "--server-key", str(key_path), *map(str, args),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        return cls(process, port, log_path)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_healthy(self) -> bool:
        assert self.process.poll() is None, f"the server exited:\n{self.log}"
        try:
            return httpx.get(f"{self.url}{API}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        assert wait_until(self.is_healthy, timeout), f"not healthy in {timeout} s:\n{self.log}"

    def api(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.url}{API}", headers=headers, timeout=30)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of GET /metrics: (name, sorted labels) -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when the server has not produced it (yet)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is cleaned up, no MQTT DISCONNECT is sent."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> str:
        """SIGTERM, wait, and the log (SIGKILL when it does not end within 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log


def json_of(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()


def write_agent_config(
    tmp_path: Path,
    device: str,
    broker_url: str,
    server_url: str,
    trust: Path,
    *,
    profile: str = PROFILE,
) -> Path:
    """An agent configuration for `device` with fast timings, at tmp_path/DEVICE.toml."""
    config_path = tmp_path / f"{device}.toml"
    write_config(
        config_path,
        AgentConfig(
            device_id=device,
            profile=profile,
            state_dir=tmp_path / device,
            trust_root=trust,
            server_url=server_url,
            mqtt=MqttSettings(url=broker_url),
            telemetry=TelemetrySettings(window_seconds=1, heartbeat_seconds=1),
            health=HealthSettings(duration_seconds=1, min_requests=0),
            local_api=LocalApiSettings(port=free_port()),
        ),
    )
    return config_path


def start_agent(
    tmp_path: Path,
    device: str,
    broker_url: str,
    server_url: str,
    trust: Path,
    *,
    profile: str = PROFILE,
) -> subprocess.Popen[bytes]:
    """`edgefleet agent run` for `device` with fast timings; its log in `agent_log`."""
    config_path = write_agent_config(
        tmp_path, device, broker_url, server_url, trust, profile=profile
    )
    with (tmp_path / f"{device}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def agent_log(tmp_path: Path, device: str) -> str:
    path = tmp_path / f"{device}.log"
    return path.read_text(errors="replace") if path.exists() else ""


__all__ = [
    "API",
    "ServerProcess",
    "agent_log",
    "json_of",
    "start_agent",
    "wait_until",
    "write_agent_config",
    "write_server_keys",
]
