"""The heartbeat restates the answer to the last directive: what its last status report said.

Real installs of real bundles (`power_loss_driver.Device`); the answer is read
from state.json, so a restarted agent restates it too, and the bytes leave it
out when there is none (servers that predate the field accept the heartbeat).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.errors import SmokeTestError
from edgefleet.agent.heartbeat import AgentReport, HeartbeatSource, directive_answer
from edgefleet.agent.install import InstallStatus
from edgefleet.agentconfig import AgentConfig
from edgefleet.errors import BelowSecurityFloorError
from edgefleet.mqtt.messages import DirectiveAnswer, Heartbeat, encode_message, parse_message
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import (
    Bundles,
    Device,
    device_config,
    make_directive,
    prepare_bundles,
)
from tests.agent.releases import release
from tests.conftest import KeySet


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


@pytest.fixture
def config(tmp_path: Path, trust: TrustRoot) -> AgentConfig:
    return device_config(tmp_path / "device", trust.raw)


def answer(status: InstallStatus) -> DirectiveAnswer | None:
    return directive_answer(status.state, status.install)


def test_a_failed_directive_is_restated_and_survives_a_restart(
    config: AgentConfig, bundles: Bundles, keyset: KeySet, tmp_path: Path
) -> None:
    device = Device.boot(config, server=tmp_path / "server")
    device.installer.install_file(bundles.releases[0])
    assert answer(device.installer.status()) is None  # a file install answers no directive
    directive = make_directive(keyset.server, device.publish(bundles.smoke_broken), sequence=3)
    with pytest.raises(SmokeTestError):
        device.installer.install_directive(directive)
    last = device.reporter.reports[-1]
    expected = DirectiveAnswer(sequence=3, install_state="failed", reason=last.reason)
    assert (last.install_state, last.directive_sequence) == ("failed", 3)
    assert answer(device.installer.status()) == expected

    restarted = device.reboot()
    assert answer(restarted.installer.status()) == expected

    beat = HeartbeatSource("cam-01", config.state_dir).beat(
        "failed", "demo", "1.0.0", report=AgentReport(answered=expected)
    )
    assert parse_message(Heartbeat, encode_message(beat)).answered == expected


def test_a_refused_directive_is_restated_as_refused(
    config: AgentConfig, bundles: Bundles, keyset: KeySet, tmp_path: Path
) -> None:
    # Serving 1.2.0, which states the floor 1.1.0, with 1.0.0 (below it) as previous.
    device = Device.boot(config, server=tmp_path / "server")
    device.installer.install_file(bundles.releases[0])
    old = device.versions.current()
    floored = release(bundles, tmp_path / "releases", keyset.release, "demo", "1.2.0", "1.1.0")
    device.installer.install_file(floored)
    device.versions.restore(device.versions.current(), old)
    directive = make_directive(keyset.server, None, sequence=5, action="rollback")
    with pytest.raises(BelowSecurityFloorError):
        device.installer.install_directive(directive)
    restated = answer(device.installer.status())
    assert restated is not None and (restated.sequence, restated.install_state) == (5, "refused")


def test_no_answer_leaves_the_field_out_of_the_bytes(tmp_path: Path) -> None:
    beat = HeartbeatSource("cam-01", tmp_path).beat("idle", None, None)
    assert b"answered" not in encode_message(beat)
