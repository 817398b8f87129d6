"""Real `edgefleet agent run` processes on one state directory: one agent per state
directory (its lock), and a restart in the middle of a health check that serves
at once and judges the new model on the traffic it gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import write_config
from edgefleet.agentconfig import AgentConfig, HealthSettings, LocalApiSettings, MqttSettings
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, free_port, mosquitto_or_skip, unique_device_id
from tests.agent.power_loss_driver import PROFILE, Bundles, prepare_bundles
from tests.agent.test_agent_run import api, cli, wait_until
from tests.conftest import KeySet
from tests.fixtures import datasets


@pytest.fixture(scope="module")
def signed_bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(tmp_path_factory.mktemp("restart-bundles"), keyset.release)


def write_agent_config(
    path: Path,
    state_dir: Path,
    trust_file: Path,
    local_api: LocalApiSettings,
    health: HealthSettings | None = None,
) -> Path:
    write_config(
        path,
        AgentConfig(
            device_id="restart-device",
            profile=PROFILE,
            state_dir=state_dir,
            trust_root=trust_file,
            local_api=local_api,
            health=health or HealthSettings(duration_seconds=1, min_requests=0),
        ),
    )
    return path


class Agents:
    """The agent processes a test started, each killed at the end if still running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, config: Path, log: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config)],
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.started.append(process)
        return process


@pytest.fixture
def agents() -> Iterator[Agents]:
    started = Agents()
    yield started
    for process in started.started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def state_of(state_dir: Path) -> str | None:
    try:
        return str(json.loads((state_dir / "state.json").read_text())["state"])
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_agent_on_the_same_state_directory_is_refused(
    tmp_path: Path, trust: TrustRoot, agents: Agents
) -> None:
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(trust.raw)
    state = tmp_path / "state"
    port = free_port()
    first_config = write_agent_config(
        tmp_path / "first.toml", state, trust_file, LocalApiSettings(port=port)
    )
    # The second would not clash on a port: only the state directory is shared.
    second_config = write_agent_config(
        tmp_path / "second.toml", state, trust_file, LocalApiSettings(enabled=False)
    )
    first = agents.start(first_config, tmp_path / "first.log")
    assert wait_until(lambda: (state / "localapi.json").exists()), "the first agent never served"
    recorded = (state / "localapi.json").read_bytes()
    token = (state / "api-token").read_bytes()

    second = subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(second_config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr
    assert f"another agent (pid {first.pid}) runs on this state directory" in second.stderr
    assert "Traceback" not in second.stderr
    # The refused agent removed nothing of the first one's.
    assert (state / "localapi.json").read_bytes() == recorded
    assert (state / "api-token").read_bytes() == token
    assert (state / "api.sock").exists()
    assert first.poll() is None
    status = cli("agent", "status", "--config", first_config)
    assert f"running at http://127.0.0.1:{port}" in status.stdout
    assert api(port, "/v1/health")["status"] == "no-model"

    # Even when the CLI cannot find the agent's API, nothing installs behind its back.
    (state / "localapi.json").unlink()
    bundle = tmp_path / "some.efb"
    bundle.write_bytes(b"not a bundle")
    install = cli("agent", "install", bundle, "--config", first_config, check=False)
    assert install.returncode == 2, install.stderr
    assert f"another agent (pid {first.pid}) runs on this state directory" in install.stderr
    rollback = cli("agent", "rollback", "--config", first_config, check=False)
    assert rollback.returncode == 2, rollback.stderr
    assert f"another agent (pid {first.pid}) runs on this state directory" in rollback.stderr
    assert state_of(state) is None  # nothing was installed

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    # Once it stopped, the state directory is free again.
    again = agents.start(second_config, tmp_path / "again.log")
    assert wait_until(lambda: (state / "localapi.json").exists())
    assert json.loads((state / "localapi.json").read_text())["pid"] == again.pid


def test_an_agent_killed_in_its_health_check_serves_and_judges_on_restart(
    tmp_path: Path, trust: TrustRoot, signed_bundles: Bundles, agents: Agents
) -> None:
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(trust.raw)
    state = tmp_path / "state"
    port = free_port()
    config = write_agent_config(
        tmp_path / "agent.toml",
        state,
        trust_file,
        LocalApiSettings(port=port),
        HealthSettings(duration_seconds=40, min_requests=5),
    )
    cli("agent", "install", signed_bundles.releases[0], "--config", config)  # in-process

    first = agents.start(config, tmp_path / "first.log")
    assert wait_until(lambda: (state / "localapi.json").exists()), "the agent never served"
    install = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "agent",
            "install",
            str(signed_bundles.releases[1]),
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: state_of(state) == "health_checking"), "no health check"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _, install_err = install.communicate(timeout=60)
    assert install.returncode == 2
    assert "the agent stopped while installing; run `edgefleet agent status`" in install_err
    assert "Traceback" not in install_err

    log = tmp_path / "second.log"
    agents.start(config, log)

    def answers() -> bool:
        try:
            return bool(api(port, "/v1/health"))
        except OSError:
            return False

    # It serves while the resumed health check runs, not only after it.
    assert wait_until(answers, timeout=30), log.read_text()
    assert state_of(state) == "health_checking", log.read_text()
    assert wait_until(
        lambda: "resuming an install interrupted at health_checking" in log.read_text()
    ), log.read_text()
    features, _ = datasets.digits_tabular()
    for row in features[:6]:
        answer = api(port, "/v1/predict", {"inputs": {"features": [row.tolist()]}})
        assert answer["model"] == "demo@1.1.0"
    assert wait_until(lambda: state_of(state) == "committed", timeout=60), log.read_text()
    reason = json.loads((state / "state.json").read_text())["install"]["reason"]
    assert "healthy over" in reason and "no traffic" not in reason, reason
    assert os.readlink(state / "current").startswith("versions/demo@1.1.0")


def test_a_stale_localapi_json_is_an_agent_that_does_not_run(
    tmp_path: Path, trust: TrustRoot, signed_bundles: Bundles, agents: Agents
) -> None:
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(trust.raw)
    state = tmp_path / "state"
    config = write_agent_config(
        tmp_path / "agent.toml", state, trust_file, LocalApiSettings(port=free_port())
    )
    # Killed: the kernel let its lock go, its localapi.json stays.
    killed = agents.start(config, tmp_path / "killed.log")
    assert wait_until(lambda: (state / "localapi.json").exists()), "the agent never served"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    status = cli("agent", "status", "--config", config)
    assert f"not running (stale localapi.json from pid {killed.pid})" in status.stdout

    # After a reboot its pid is another process's (here: this test's), and nothing
    # listens on its port any more.
    (state / "localapi.json").write_text(
        json.dumps({"host": "127.0.0.1", "port": free_port(), "pid": os.getpid()})
    )
    status = cli("agent", "status", "--config", config)
    assert f"not running (stale localapi.json from pid {os.getpid()})" in status.stdout
    as_json = json.loads(cli("agent", "status", "--json", "--config", config).stdout)
    assert as_json["running"] is False
    assert (as_json["device_id"], as_json["profile"]) == ("restart-device", PROFILE)
    installed = cli("agent", "install", signed_bundles.releases[0], "--config", config)
    assert "demo@1.0.0" in installed.stdout
    features, _ = datasets.digits_tabular()
    np.savez(tmp_path / "batch.npz", features=features[:4])
    predicted = cli("agent", "predict", "--input", tmp_path / "batch.npz", "--config", config)
    assert "in this process" in predicted.stdout


def test_the_log_says_each_connect_each_broker_problem_once_and_the_stop(
    tmp_path: Path, trust: TrustRoot, signed_bundles: Bundles, agents: Agents
) -> None:
    mosquitto_or_skip()
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(trust.raw)
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    write_config(
        config,
        AgentConfig(
            device_id=unique_device_id("logs"),
            profile=PROFILE,
            state_dir=state,
            trust_root=trust_file,
            local_api=LocalApiSettings(port=free_port()),
            health=HealthSettings(duration_seconds=1, min_requests=0),
            mqtt=MqttSettings(url="mqtt://127.0.0.1:1"),  # replaced below
        ),
    )
    cli("agent", "install", signed_bundles.releases[0], "--config", config)  # in-process
    with MosquittoBroker.running(tmp_path / "broker") as broker:
        config.write_text(config.read_text().replace("mqtt://127.0.0.1:1", broker.url))
        log = tmp_path / "agent.log"
        agent = agents.start(config, log)
        assert wait_until(lambda: "connected to the broker at" in log.read_text()), log.read_text()
        broker.stop()
        assert wait_until(lambda: "connection to the broker ended" in log.read_text())
        broker.start()
        assert wait_until(lambda: "(again: connection 2)" in log.read_text()), log.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert sum("connected to the broker at" in line for line in lines) == 2, lines
    # Each broker problem once, by the link, never again by the runner.
    problems = [line for line in lines if "connection to the broker ended" in line]
    assert problems and all("edgefleet.agent.link:" in line for line in problems), problems
    assert lines[-2].endswith("edgefleet.agent.runner: stopping (SIGTERM)"), lines[-3:]
    assert lines[-1].endswith("edgefleet.agent.runner: stopped"), lines[-3:]
    # The install committed before this start is not news of this start.
    assert not [line for line in lines if "install committed" in line], lines
