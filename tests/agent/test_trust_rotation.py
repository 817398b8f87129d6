"""Trust that reaches a device: an agent that slept through two trust-root rotations walks
v1 -> v2 -> v3 from the retained topics of a real mosquitto, persists v3 in state.json, and
from then on trusts only v3's server key; the fleet timestamp's sequence survives a restart."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.cli import agent as agent_group
from edgefleet.agent.config import write_config
from edgefleet.agent.install.record import StateFile, load_state
from edgefleet.agent.runner import Agent
from edgefleet.agentconfig import AgentConfig, LocalApiSettings, MqttSettings
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.keys import SigningKey
from edgefleet.mqtt.directives import (
    Directive,
    FleetTimestamp,
    sign_directive,
    sign_fleet_timestamp,
)
from edgefleet.mqtt.topics import DeviceTopics, fleet_timestamp_topic, trust_root_topic
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot, parse_trust_root, rotate_trust_root
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip, publish_once, unique_device_id
from tests.agent.power_loss_driver import PROFILE
from tests.agent.test_agent_run import wait_until
from tests.conftest import KeySet, make_trust_root

LATER = utcnow() + dt.timedelta(days=30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


class Device:
    """A device's agent in this process, flashed with `flashed`, started and stopped at will."""

    def __init__(self, tmp_path: Path, flashed: TrustRoot, broker_url: str) -> None:
        (tmp_path / "trust.json").write_bytes(flashed.raw)
        self.config = AgentConfig(
            device_id=unique_device_id("rotate"),
            profile=PROFILE,
            state_dir=tmp_path / "state",
            trust_root=tmp_path / "trust.json",
            mqtt=MqttSettings(url=broker_url),
            local_api=LocalApiSettings(enabled=False),
        )
        self.broker_url = broker_url

    def state(self) -> StateFile:
        return load_state(self.config.state_dir / "state.json")

    def root_version(self) -> int | None:
        text = self.state().trust_root
        return None if text is None else parse_trust_root(text.encode(), "state").version

    def running(self) -> _Running:
        return _Running(Agent(self.config))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        publish_once(self.broker_url, topic, payload, retain=retain)


class _Running:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def __enter__(self) -> Agent:
        self.thread.start()
        link = self.agent.link
        assert link is not None and wait_until(lambda: link.is_connected)
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.stopping.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _timestamp(sequence: int, server: SigningKey, root_version: int) -> bytes:
    now = utcnow()
    return sign_fleet_timestamp(
        FleetTimestamp(
            sequence=sequence,
            issued=format_time(now - dt.timedelta(minutes=1)),
            expires=format_time(now + dt.timedelta(hours=1)),
            trust_root_version=root_version,
        ),
        [server],
    )


def _diagnostics(device_id: str, sequence: int, server: SigningKey) -> bytes:
    now = utcnow()
    directive = Directive(
        device_id=device_id,
        sequence=sequence,
        issued=format_time(now - dt.timedelta(minutes=1)),
        expires=format_time(now + dt.timedelta(hours=1)),
        action="diagnostics",
        request_id=sequence,
    )
    return sign_directive(directive, [server])


def test_an_agent_that_slept_through_two_rotations_walks_to_the_newest_root(
    tmp_path: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    root2, release2, server2, server3 = (SigningKey.generate() for _ in range(4))
    v1 = make_trust_root(keys)
    v2 = rotate_trust_root(
        v1,
        signers=[keys.root, root2],
        expires=LATER,
        root=[root2.public],
        release=[release2.public],
        server=[server2.public],
    )
    v3 = rotate_trust_root(v2, signers=[root2], expires=LATER, server=[server3.public])
    device = Device(tmp_path, v1, broker.url)
    with device.running():  # before the rotations: its state says v1
        device.publish(fleet_timestamp_topic(), _timestamp(1, keys.server, 1), retain=True)
        assert wait_until(lambda: device.state().fleet_timestamp_sequence == 1)
    assert device.root_version() == 1
    # Offline through both rotations; the server publishes each version, retained.
    device.publish(trust_root_topic(3), v3.raw, retain=True)
    device.publish(trust_root_topic(2), v2.raw, retain=True)
    directive_topic = DeviceTopics(device.config.device_id).directive
    with caplog.at_level(logging.INFO), device.running() as agent:
        assert wait_until(lambda: device.root_version() == 3)
        assert agent.full_status()["trust_root_version"] == 3
        # Signed by the v1 server key that v2 dropped (sequence 7), then by v3's (sequence 6):
        # had the first been taken, the second would be a replay.
        device.publish(directive_topic, _diagnostics(device.config.device_id, 7, keys.server))
        device.publish(directive_topic, _diagnostics(device.config.device_id, 6, server3))
        assert wait_until(lambda: device.state().last_directive_sequence == 6)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("directive ")]
    assert len(refusals) == 1 and "unknown-key" in refusals[0]
    assert device.state().last_directive_sequence == 6
    # `agent status`, with the agent stopped, reads the root from state.json.
    config_path = tmp_path / "agent.toml"
    write_config(config_path, device.config)
    capsys.readouterr()
    assert run_with_error_handling(agent_group, ["status", "--config", str(config_path)]) == 0
    assert f"trust root:      version 3 (expires {v3.signed.expires})" in capsys.readouterr().out


def test_a_refused_root_is_not_kept_and_an_older_timestamp_is_refused_after_a_restart(
    tmp_path: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    v1 = make_trust_root(keys)
    stranger = SigningKey.generate()
    # A version 2 signed only by a root key version 1 does not list.
    forged = rotate_trust_root(
        make_trust_root(KeySet(stranger, keys.release, keys.server)),
        signers=[stranger],
        expires=LATER,
    )
    device = Device(tmp_path, v1, broker.url)
    with device.running():
        device.publish(fleet_timestamp_topic(), _timestamp(5, keys.server, 1), retain=True)
        assert wait_until(lambda: device.state().fleet_timestamp_sequence == 5)
    device.publish(fleet_timestamp_topic(), _timestamp(3, keys.server, 1), retain=True)
    device.publish(trust_root_topic(2), forged.raw, retain=True)
    with caplog.at_level(logging.INFO), device.running():
        assert wait_until(
            lambda: any("fleet timestamp refused" in r.getMessage() for r in caplog.records)
        )
        assert wait_until(
            lambda: any("trust root version 2 refused" in r.getMessage() for r in caplog.records)
        )
    state = device.state()
    assert state.fleet_timestamp_sequence == 5 and device.root_version() == 1
