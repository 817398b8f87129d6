"""The agent's state is its own: private modes, and no install copies its key out.

A real installer behind a real local API: an install of a file in the state
directory (directly or through a symlink) is refused before anything is
copied (the local API takes only the bundle's bytes), and after an install
every directory of the state is 0700 and the files that hold the device's
state and downloads are 0600.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.errors import PrivatePathError
from edgefleet.agent.inference import Predictor
from edgefleet.agent.install import State
from edgefleet.agent.install.fetch import LocalFileFetcher
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.localapi import BUNDLE, LocalApi
from edgefleet.agent.runner import status_dict
from edgefleet.agentconfig import AgentConfig, InferenceSettings
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import PROFILE, Bundles, Device, device_config, prepare_bundles
from tests.agent.test_localapi import TOKEN, Client
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


@pytest.fixture
def device(config: AgentConfig, tmp_path: Path) -> Device:
    return Device.boot(config, server=tmp_path / "server")


@pytest.fixture
def client(device: Device) -> Iterator[Client]:
    def install(path: Path) -> dict[str, Any]:
        device.installer.install_upload(path)
        return status_dict(device.installer)

    predictor = Predictor.open(device.installer.layout, InferenceSettings(), PROFILE)
    api = LocalApi(
        predictor,
        "127.0.0.1",
        0,
        install=install,
        rollback=lambda: status_dict(device.installer),
        install_state=lambda: device.installer.status().state.value,
        token=TOKEN,
        uploads=device.installer.layout.downloads,
        max_bundle_bytes=1 << 30,
    )
    api.start()
    yield Client(api.address[1], TOKEN)
    api.stop()
    predictor.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_an_install_of_a_file_in_the_state_directory_is_refused(
    device: Device, tmp_path: Path
) -> None:
    layout = device.installer.layout
    secret = layout.root / "device.key"
    secret.write_bytes(b"\x01" * 32)
    link = tmp_path / "innocent.efb"
    link.symlink_to(secret)
    for path in (secret, link, layout.root / "downloads" / ".." / "device.key"):
        with pytest.raises(PrivatePathError, match="state directory"):
            device.installer.install_file(path)
    assert list(layout.downloads.iterdir()) == []
    assert device.installer.status().install is None  # nothing was started


def test_an_install_through_the_api_leaves_the_state_private(
    device: Device, client: Client, bundles: Bundles, tmp_path: Path
) -> None:
    layout: StateLayout = device.installer.layout
    layout.root.chmod(0o755)  # a state directory made readable by an older agent
    layout.downloads.chmod(0o755)
    status, data = client.request("POST", "/v1/install", bundles.releases[0].read_bytes(), BUNDLE)
    answer = json.loads(data)
    assert status == 200 and answer["state"] == State.COMMITTED.value, answer
    device.installer.layout.create()  # as every start of the agent does
    for directory in (layout.root, layout.trust_dir, layout.downloads, layout.versions):
        assert _mode(directory) == 0o700, directory
    # Every directory under it too, those made by the install included.
    made = [p for p in layout.root.rglob("*") if p.is_dir() and not p.is_symlink()]
    assert layout.timings in made and layout.versions / answer["current"] in made
    assert {str(d): oct(_mode(d)) for d in made if _mode(d) != 0o700} == {}
    assert _mode(layout.state_file) == 0o600


def test_a_bundle_copied_into_downloads_is_private(device: Device, bundles: Bundles) -> None:
    """The copy a local install makes (its partial file renamed into place) is 0600."""
    downloads = device.installer.layout.downloads
    LocalFileFetcher(bundles.releases[0]).copy(downloads / "copy.efb", 1 << 30)
    assert _mode(downloads / "copy.efb") == 0o600
