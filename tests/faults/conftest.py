"""The fault tests' fleet: a real mosquitto, `edgefleet server run`, `edgefleet agent run`.

`FaultFleet` starts the server (SQLite, open enrollment) on a mosquitto with
persistence, pushes the signed bundles and starts agents, each its own process,
identity and state directory, enrolled by itself. An agent can reach the broker
through a `CuttableProxy`, a TCP relay the test cuts (every connection dropped,
new ones refused) and restores. `FaultFleet.account` checks the two promises
every fault test makes for each device: every status report the agent numbered
is stored by the server once, none missing (its outbox empty), and it installed
each version once (one `versions/` entry, one `committed` report per version).

Waits are conditions with deadlines; a test without mosquitto is skipped, unless
EDGEFLEET_REQUIRE_MOSQUITTO=1 makes that a failure.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import write_config
from edgefleet.agent.install.record import load_state
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.outbox import outbox_is_empty
from edgefleet.agentconfig import (
    AgentConfig,
    HealthSettings,
    Limits,
    LocalApiSettings,
    MqttSettings,
    TelemetrySettings,
)
from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.server.tokens import create_api_token
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, free_port, host_port, mosquitto_or_skip
from tests.agent.power_loss_driver import PROFILE, Bundles, prepare_bundles
from tests.conftest import KeySet
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys

WAIT = 90.0  # seconds: the bound on a wait for the fleet to get somewhere
KEEPALIVE_S = 5  # the agents' MQTT keepalive: the broker notices a dead link in 7.5 s


class CuttableProxy:
    """A TCP relay from a local port to `target`; `cut` drops every connection and refuses
    new ones (as a dead link would), `restore` lets them through again."""

    def __init__(self, target: str) -> None:
        self.target = host_port(target)
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for end in sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        self._thread.join(5)


@dataclass
class Agent:
    """One `edgefleet agent run` process with its own configuration and state."""

    device_id: str
    config_path: Path
    log_path: Path
    layout: StateLayout
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "agent", "run", "--config",
                 str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM, as systemd stops it (SIGKILL when it does not end within 30 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def report_sequence(self) -> int:
        """The sequence of the last status report the agent numbered (its state.json)."""
        return load_state(self.layout.state_file).report_sequence

    def install_state(self) -> str:
        """The state its install machine rests in, as it persisted it."""
        return load_state(self.layout.state_file).state.value

    def installed(self) -> list[str]:
        """The entries of versions/: `<name>@<version>-<sha256[:12]>`, one per install."""
        versions = self.layout.versions
        return sorted(p.name for p in versions.iterdir()) if versions.is_dir() else []


class FaultFleet:
    """The server, its broker, its agents, and an operator's view through the API."""

    def __init__(
        self, directory: Path, broker: MosquittoBroker, keyset: KeySet, trust: TrustRoot
    ) -> None:
        self.directory = directory
        self.broker = broker
        self.trust_path, self.key_path = write_server_keys(directory / "keys", trust, keyset)
        self.db_url = f"sqlite:///{directory / 'server.db'}"
        self.server: ServerProcess | None = None
        self.servers: list[ServerProcess] = []
        self.agents: dict[str, Agent] = {}
        self.token = ""

    def start_server(self) -> ServerProcess:
        """Start the server; a restart takes the same port (the agents know its URL)."""
        name = f"server{len(self.servers)}"
        server = ServerProcess.start(
            self.directory / f"{name}.log", self.trust_path, self.key_path,
            "--db", self.db_url, "--mqtt", self.broker.url, "--data", self.directory / "data",
            "--open-enrollment", port=self.server.port if self.server else None,
        )  # fmt: skip
        self.servers.append(server)
        self.server = server
        server.wait_healthy()
        if not self.token:
            db = Database(self.db_url)
            try:
                with db.session() as session:
                    self.token, _ = create_api_token(session, "ops", Role.OPERATOR)
            finally:
                db.dispose()
        return server

    def get(self, path: str) -> Any:
        assert self.server is not None
        with self.server.api(self.token) as api:
            return json_of(api.get(path), 200)

    def push(self, bundle: Path) -> None:
        assert self.server is not None
        with self.server.api(self.token) as api:
            pushed = api.post(
                "/bundles",
                content=bundle.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            json_of(pushed, 201)

    def add_agent(
        self,
        device_id: str,
        *,
        mqtt_url: str | None = None,
        limits: Limits | None = None,
        health_check_s: float = 1.0,
    ) -> Agent:
        """Start `edgefleet agent run` for `device_id` (again, with a new configuration)."""
        config_path = self.directory / f"{device_id}.toml"
        assert self.server is not None
        write_config(
            config_path,
            AgentConfig(
                device_id=device_id,
                profile=PROFILE,
                state_dir=self.directory / device_id,
                trust_root=self.trust_path,
                server_url=self.server.url,
                mqtt=MqttSettings(url=mqtt_url or self.broker.url, keepalive_seconds=KEEPALIVE_S),
                limits=limits or Limits(),
                telemetry=TelemetrySettings(window_seconds=1, heartbeat_seconds=1),
                health=HealthSettings(duration_seconds=health_check_s, min_requests=0),
                local_api=LocalApiSettings(port=free_port()),
            ),
        )
        agent = Agent(
            device_id, config_path, self.directory / f"{device_id}.log",
            StateLayout(self.directory / device_id),
        )  # fmt: skip
        self.agents[device_id] = agent
        agent.start()
        return agent

    def devices(self) -> dict[str, dict[str, Any]]:
        listed = self.get("/devices?limit=100")
        return {item["id"]: item for item in listed["items"]}

    def online(self, device_ids: list[str]) -> bool:
        listed = self.devices()
        return all(d in listed and listed[d]["online"] for d in device_ids)

    def start_rollout(self, version: str, stages: list[dict[str, Any]], **plan_fields: Any) -> int:
        assert self.server is not None
        plan = {"stages": stages, "gates": {"bake_s": 1}, **plan_fields}
        with self.server.api(self.token) as api:
            started = api.post("/rollouts", json={"bundle": f"demo@{version}", "plan": plan})
            return int(json_of(started, 201)["id"])

    def rollout(self, rollout_id: int) -> Any:
        return self.get(f"/rollouts/{rollout_id}")

    def wait_for_state(self, rollout_id: int, states: set[str], timeout: float = WAIT) -> Any:
        """The rollout once it reached one of `states` (asserted, with every log on failure)."""
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.rollout(rollout_id))
            return found["state"] in states

        assert wait_until(reached, timeout, interval=0.5), f"{found}\n{self.logs()}"
        return found

    def logs(self) -> str:
        parts = [f"--- {a.device_id}\n{a.log}" for a in self.agents.values()]
        parts += [f"--- {s.log_path.name}\n{s.log}" for s in self.servers]
        return "\n".join(parts)

    def account(self, agent: Agent) -> list[dict[str, Any]]:
        """Every report the agent numbered is stored once (outbox drained), none missing;
        each version was installed once. The stored reports, lowest sequence first."""

        def delivered() -> bool:
            sent = agent.report_sequence()
            stored = self.get(f"/devices/{agent.device_id}")["status_reports"]
            return outbox_is_empty(agent.layout.outbox) and (
                sent == 0 or bool(stored and stored[0]["sequence"] == sent)
            )

        assert wait_until(delivered, WAIT, interval=0.5), agent.log
        reports = sorted(
            self.get(f"/devices/{agent.device_id}")["status_reports"], key=lambda r: r["sequence"]
        )
        sequences = [r["sequence"] for r in reports]
        assert len(set(sequences)) == len(sequences), sequences  # none stored twice
        missing = set(range(1, agent.report_sequence() + 1)) - set(sequences)
        assert not missing, missing
        committed = Counter(
            r["bundle_version"] for r in reports if r["install_state"] == "committed"
        )
        assert all(count == 1 for count in committed.values()), reports
        installed = Counter(name.split("@", 1)[1].rsplit("-", 1)[0] for name in agent.installed())
        assert all(count == 1 for count in installed.values()), agent.installed()
        assert set(committed) <= set(installed), (committed, agent.installed())
        return reports

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for server in self.servers:
            log = server.stop()
            assert "Traceback" not in log, log


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("fault-bundles"), keyset.release)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def fleet(
    tmp_path: Path, broker: MosquittoBroker, keyset: KeySet, trust: TrustRoot, releases: Bundles
) -> Iterator[FaultFleet]:
    """A running server with demo@1.0.0 and demo@1.1.0 pushed, and no agent yet."""
    running = FaultFleet(tmp_path, broker, keyset, trust)
    try:
        running.start_server()
        for bundle in releases.releases[:2]:
            running.push(bundle)
        yield running
    finally:
        running.close()
