"""The agent as a field engineer runs it: `edgefleet agent run` against a real mosquitto.

One agent process, end to end: a USB-stick install through the running agent,
predictions through the local API and `agent predict`, a signed directive over
MQTT that installs the next version from an HTTP server, status reports,
heartbeats and telemetry on the broker, and a clean stop on SIGTERM. Then, in
this process, the install worker surviving a foreign error, and the systemd
watchdog petted only while that worker lives.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from edgefleet.agent.config import write_config
from edgefleet.agent.link import AgentLink
from edgefleet.agent.runner import TICK_SECONDS, Agent, _Reporter
from edgefleet.agentconfig import (
    AgentConfig,
    HealthSettings,
    LocalApiSettings,
    MqttSettings,
    TelemetrySettings,
)
from edgefleet.mqtt.directives import (
    BundleRef,
    Directive,
    FleetTimestamp,
    HttpSource,
    sign_directive,
    sign_fleet_timestamp,
)
from edgefleet.mqtt.messages import Heartbeat, StatusReport, encode_message, parse_message
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import (
    MosquittoBroker,
    Observer,
    free_port,
    mosquitto_or_skip,
    publish_once,
    unique_device_id,
)
from tests.agent.power_loss_driver import PROFILE, Bundles, prepare_bundles
from tests.conftest import KeySet
from tests.fixtures import datasets

WAIT = 60.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def signed_bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("run-bundles"), keyset.release)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server(signed_bundles: Bundles) -> Iterator[str]:
    directory = str(signed_bundles.releases[0].parent)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietFiles, directory=directory)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def api(port: int, path: str, payload: dict[str, object] | None = None) -> dict[str, object]:
    body = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def test_agent_serves_installs_and_reports(
    tmp_path: Path,
    broker: MosquittoBroker,
    file_server: str,
    signed_bundles: Bundles,
    keyset: KeySet,
    trust: TrustRoot,
) -> None:
    device = unique_device_id("run")
    (tmp_path / "trust.json").write_bytes(trust.raw)
    port = free_port()
    config_path = tmp_path / "agent.toml"
    write_config(
        config_path,
        AgentConfig(
            device_id=device,
            profile=PROFILE,
            state_dir=tmp_path / "state",
            trust_root=tmp_path / "trust.json",
            mqtt=MqttSettings(url=broker.url),
            telemetry=TelemetrySettings(window_seconds=1, heartbeat_seconds=1),
            health=HealthSettings(duration_seconds=1, min_requests=0),
            local_api=LocalApiSettings(port=port),
        ),
    )
    topics = DeviceTopics(device)
    observer = Observer(broker.url, [topics.subtree])
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(lambda: (tmp_path / "state" / "localapi.json").exists()), "no API"
        assert api(port, "/v1/health")["status"] == "no-model"

        # A field engineer's USB stick, through the running agent.
        first = signed_bundles.releases[0]
        installed = cli("agent", "install", first, "--config", config_path)
        assert "demo@1.0.0" in installed.stdout

        features, labels = datasets.digits_tabular()
        answer = api(port, "/v1/predict", {"inputs": {"features": features[:1].tolist()}})
        assert answer["answered_by"] == "primary" and answer["model"] == "demo@1.0.0"
        assert int(np.argmax(answer["outputs"]["probabilities"])) == labels[0]  # type: ignore[index]
        np.savez(tmp_path / "batch.npz", features=features[:16])
        predicted = cli(
            "agent",
            "predict",
            "--input",
            tmp_path / "batch.npz",
            "-o",
            tmp_path / "out.npz",
            "--config",
            config_path,
        )
        assert "running agent" in predicted.stdout
        with np.load(tmp_path / "out.npz") as out:
            assert out["probabilities"].shape == (16, 10)

        # The operator's directive: install 1.1.0 from the HTTP server.
        second = signed_bundles.releases[1]
        data = second.read_bytes()
        directive = Directive(
            device_id=device,
            sequence=1,
            action="install",
            issued=format_time(utcnow()),
            expires=format_time(utcnow() + dt.timedelta(hours=1)),
            bundle=BundleRef(
                name="demo",
                version="1.1.0",
                sha256=hashlib.sha256(data).hexdigest(),
                length=len(data),
            ),
            sources=[HttpSource(url=f"{file_server}/{second.name}")],
        )
        publish_once(
            broker.url, topics.directive, sign_directive(directive, [keyset.server]), qos=1
        )
        done = {
            "model": "demo@1.1.0",
            "install_state": "committed",
            "status": "ok",
            "detail": None,
            "drift": "insufficient",  # no traffic: the device's check has no verdict yet
            "link": "connected",
        }
        assert wait_until(lambda: api(port, "/v1/health") == done), agent_log(agent)

        status = json.loads(cli("agent", "status", "--json", "--config", config_path).stdout)
        assert status["running"] and status["state"] == "committed"
        assert status["drift"] == "insufficient" and status["link"] == "connected"
        shown = cli("agent", "status", "--config", config_path).stdout
        assert "broker link:     connected\n" in shown
        assert status["current"].startswith("demo@1.1.0")
        assert status["previous"].startswith("demo@1.0.0")

        def reports() -> list[dict[str, object]]:
            return [json.loads(p) for p in observer.on(topics.status)]

        assert wait_until(
            lambda: any(
                r["install_state"] == "committed" and r.get("bundle_version") == "1.1.0"
                for r in reports()
            )
        )

        def heartbeats() -> list[Heartbeat]:
            return [parse_message(Heartbeat, p) for p in observer.on(topics.heartbeat)]

        # What the agent reports of itself passes the wire model the server parses with.
        assert wait_until(lambda: any(b.breakers for b in heartbeats()))
        reporting = next(b for b in heartbeats() if b.breakers)
        assert reporting.link is not None and reporting.link.connects >= 1
        assert reporting.breakers is not None and reporting.breakers[0].step == "primary"
        assert {b.state for b in reporting.breakers} <= {"closed", "open", "half-open"}
        assert reporting.trust_root_version == trust.version
        assert reporting.frozen_out is False and reporting.frozen_reason is None
        assert wait_until(
            lambda: any(json.loads(w)["requests"] > 0 for w in observer.on(topics.telemetry))
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
        observer.close()
    assert agent.returncode == 0, agent_log(agent)
    assert not (tmp_path / "state" / "localapi.json").exists()


def agent_log(agent: subprocess.Popen[str]) -> str:
    if agent.poll() is None:
        return "(agent still running)"
    return agent.stdout.read() if agent.stdout else ""


# --- several agents on one machine; an agent without its local API -----------------------------


def init_device(tmp_path: Path, name: str, trust: TrustRoot, *local_api_port: str) -> Path:
    """`agent init` for an offline device `name` under tmp_path; returns its agent.toml."""
    (tmp_path / "trust.json").write_bytes(trust.raw)
    config = tmp_path / name / "agent.toml"
    port_option = ["--local-api-port", *local_api_port] if local_api_port else []
    cli(
        "agent", "init", "--device-id", name, "--trust", tmp_path / "trust.json",
        "--profile", PROFILE, "--state-dir", tmp_path / name / "state", *port_option,
        "-o", config,
    )  # fmt: skip
    return config


def start_agent(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_agent(agent: subprocess.Popen[str]) -> None:
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def running_record(config: Path) -> dict[str, object] | None:
    path = config.parent / "state" / "localapi.json"
    record: dict[str, object] | None = json.loads(path.read_text()) if path.exists() else None
    return record


def test_two_agents_on_one_machine_each_on_its_own_port(tmp_path: Path, trust: TrustRoot) -> None:
    ports = [free_port(), free_port()]
    configs = [init_device(tmp_path, f"cam-{n}", trust, str(port)) for n, port in enumerate(ports)]
    agents = [start_agent(config) for config in configs]
    try:
        for config, port, agent in zip(configs, ports, agents, strict=True):
            assert wait_until((config.parent / "state" / "localapi.json").exists), agent_log(agent)
            assert running_record(config) == {"host": "127.0.0.1", "port": port, "pid": agent.pid}
            assert api(port, "/v1/health")["status"] == "no-model"

        # A third configured with the first one's port stops at once, saying what to change.
        clash = init_device(tmp_path, "cam-2", trust, str(ports[0]))
        third = cli("agent", "run", "--config", clash, check=False)
        assert third.returncode == 2
        assert third.stdout == "" and third.stderr.count("\n") == 1
        assert third.stderr.startswith(
            f"error [config]: the local API cannot listen on 127.0.0.1:{ports[0]}: "
            "Address already in use; set [local_api] port in agent.toml to a free port"
        )
        assert "--local-api-port" in third.stderr and "enabled = false" in third.stderr
        assert not (clash.parent / "state" / "state.json").exists()  # it did not start
    finally:
        for agent in agents:
            stop_agent(agent)
    assert [agent.returncode for agent in agents] == [0, 0]


def test_an_agent_without_its_local_api(
    tmp_path: Path, trust: TrustRoot, signed_bundles: Bundles
) -> None:
    config = init_device(tmp_path, "cam-quiet", trust, "none")
    assert "[local_api]\nenabled = false\n" in config.read_text()
    cli("agent", "install", signed_bundles.releases[0], "--config", config)  # none runs yet
    agent = start_agent(config)
    try:
        assert wait_until(lambda: running_record(config) is not None), agent_log(agent)
        assert running_record(config) == {"host": None, "port": None, "pid": agent.pid}
        status = json.loads(cli("agent", "status", "--json", "--config", config).stdout)
        assert status["running"] and status["current"].startswith("demo@1.0.0")

        features, _ = datasets.digits_tabular()
        np.savez(tmp_path / "batch.npz", features=features[:4])
        predicted = cli("agent", "predict", "--input", tmp_path / "batch.npz", "--config", config)
        assert "in this process" in predicted.stdout

        # A change behind the running agent's back would not reach the model it serves.
        refused = cli(
            "agent", "install", signed_bundles.releases[1], "--config", config, check=False
        )
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert refused.stderr.startswith(
            f"error [usage]: the agent (pid {agent.pid}) runs without its local API"
        )
        assert "stop it first" in refused.stderr
        assert agent.poll() is None
    finally:
        stop_agent(agent)
    assert agent.returncode == 0, agent_log(agent)
    assert running_record(config) is None


# --- the install worker, and the systemd watchdog that watches it -------------------------------


def quiet_agent(tmp_path: Path, trust: TrustRoot, broker_url: str | None = None) -> Agent:
    """An agent in this process: no local API, nothing installed, a broker if given."""
    (tmp_path / "trust.json").write_bytes(trust.raw)
    return Agent(
        AgentConfig(
            device_id=unique_device_id("worker"),
            profile=PROFILE,
            state_dir=tmp_path / "state",
            trust_root=tmp_path / "trust.json",
            mqtt=MqttSettings(url=broker_url),
            local_api=LocalApiSettings(enabled=False),
        )
    )


def test_frozen_out_is_reported_until_a_fresh_fleet_timestamp_arrives(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet
) -> None:
    agent = quiet_agent(tmp_path, trust)

    def stamp(sequence: int, lifetime: dt.timedelta) -> bytes:
        now = utcnow()
        return sign_fleet_timestamp(
            FleetTimestamp(
                issued=format_time(now),
                expires=format_time(now + lifetime),
                sequence=sequence,
                trust_root_version=trust.version,
            ),
            [keyset.server],
        )

    def frozen_reason() -> str | None:
        agent._check_frozen_out()  # what the main loop does at every tick
        return agent.report(None).frozen_reason

    def receive(payload: bytes) -> None:
        agent._receive_fleet_timestamp(payload)  # the link's thread
        agent._install_inbox()  # the install worker's step verifies and persists it

    published: list[StatusReport] = []

    class Link:  # the one thing the reporter uses of the agent's link
        def publish(self, kind: TopicKind, message: StatusReport) -> None:
            published.append(message)

    reporter = _Reporter(cast(AgentLink, Link()), lambda: agent._frozen_reason)
    report = StatusReport(
        device_id=agent.config.device_id,
        sent_at=format_time(utcnow()),
        sequence=1,
        install_state="idle",
    )

    receive(stamp(1, dt.timedelta(seconds=2)))
    assert frozen_reason() is None
    reporter.report(report)
    assert b"frozen_reason" not in encode_message(published[-1])  # older servers take it
    assert wait_until(lambda: frozen_reason() is not None)  # its expiry passes
    reason = frozen_reason()
    assert reason is not None and reason.startswith("the newest fleet timestamp expired at ")
    beat = agent.heartbeats.beat("idle", None, None, report=agent.report(None))
    assert beat.frozen_out and beat.frozen_reason == reason
    reporter.report(report)
    assert published[-1].frozen_reason == reason  # status reports say it too
    assert beat.trust_root_version == trust.version
    receive(stamp(2, dt.timedelta(hours=1)))
    assert frozen_reason() is None


def test_the_install_worker_survives_a_foreign_error(
    tmp_path: Path, trust: TrustRoot, caplog: pytest.LogCaptureFixture
) -> None:
    agent = quiet_agent(tmp_path, trust)
    worker = agent.install_worker
    unreadable = agent.layout.inbox / f"{1:020d}.directive"
    unreadable.mkdir()  # reading it fails with an OSError, as a broken disk would
    with caplog.at_level(logging.INFO):
        worker.start()
        try:
            assert wait_until(lambda: worker.failures == 1)
            assert unreadable.exists()  # kept, to be tried again
            unreadable.rmdir()
            refused = agent.layout.inbox / f"{2:020d}.directive"
            refused.write_bytes(b"not a directive")
            assert wait_until(lambda: not refused.exists())  # the next step ran
            # The step that removed it marks the worker healthy when it returns.
            assert wait_until(lambda: worker.healthy)
            assert worker.alive and worker.failures == 1
        finally:
            worker.stop()
    assert isinstance(worker.last_failure, IsADirectoryError)
    [logged] = [r for r in caplog.records if r.exc_info and r.exc_info[1] is worker.last_failure]
    assert logged.levelno == logging.ERROR and logged.getMessage().startswith("edgefleet-install")
    assert any(r.getMessage().startswith(f"directive {refused.name}: ") for r in caplog.records)


@pytest.mark.parametrize("ending", ["install worker", "MQTT link"])
def test_the_watchdog_is_petted_only_while_the_workers_live(
    ending: str,
    tmp_path: Path,
    trust: TrustRoot,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    broker: MosquittoBroker | None = None
    if ending == "MQTT link":
        broker = request.getfixturevalue("broker")
    agent = quiet_agent(tmp_path, trust, broker.url if broker else None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify.sock"))
        systemd.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pet at every tick of the main loop
        running = threading.Thread(target=agent.run, daemon=True)
        running.start()
        try:
            assert systemd.recv(64) == b"READY=1"
            assert [systemd.recv(64) for _ in range(2)] == [b"WATCHDOG=1"] * 2
            if agent.link is None:
                agent.install_worker.stop()  # it ends; the agent's main loop goes on
            else:
                agent.link.stop()  # its network thread ends; the main loop goes on
            assert wait_until(
                lambda: any(
                    r.message.startswith(f"the {ending} ended")
                    and "watchdog is no longer petted" in r.message
                    for r in caplog.records
                )
            )
            # What was petted before the main loop saw the worker dead is in the buffer.
            systemd.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while systemd.recv(64) == b"WATCHDOG=1":
                    pass
            systemd.settimeout(5 * TICK_SECONDS)  # five ticks of the main loop
            with pytest.raises(TimeoutError):
                systemd.recv(64)
            assert running.is_alive()  # it serves on: systemd is the one to restart it
        finally:
            agent.stopping.set()
            running.join(30)
    assert not running.is_alive()
