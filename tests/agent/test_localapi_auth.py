"""The local API as a local attacker sees it: only root and the agent's user change the device.

A real installer (two versions installed) behind a real local API on TCP and on
its Unix socket, in a state directory whose parents everyone may traverse, so
that only the agent's own modes keep the attacker out. The attacker is a
separate process running as the unprivileged user `nobody`: on TCP without the
token its rollback and install get 401 and nothing changes; it can read
neither the token nor connect to the socket; it still predicts. The CLI as
root installs and rolls back through the socket (or TCP and the token file);
as `nobody` it says in one line what to do.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from edgefleet.agent.cli import agent as agent_group
from edgefleet.agent.config import write_config
from edgefleet.agent.inference import Predictor
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.localapi import LocalApi, issue_token, listen, listen_unix
from edgefleet.agent.runner import status_dict
from edgefleet.agentconfig import InferenceSettings
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import PROFILE, Bundles, Device, device_config, prepare_bundles
from tests.conftest import KeySet
from tests.fixtures import datasets

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the attacker as nobody")


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    """Signed releases demo 1.0.0 to 1.3.0."""
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


def as_nobody(action: Callable[[], str]) -> str:
    """What `action` returns, run in a child process as the unprivileged user `nobody`."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                result = action()
            except Exception as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def post(port: int, path: str, kind: str, body: bytes, authorization: str = "") -> str:
    """The status the agent answers a POST with (as text)."""
    headers = {"Content-Type": kind, "Host": "127.0.0.1"}
    if authorization:
        headers["Authorization"] = authorization
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body, headers)
    return str(connection.getresponse().status)


def reach(layout: StateLayout) -> str:
    """What reading the token and connecting to the socket did."""
    outcomes = []
    try:
        outcomes.append(layout.local_api_token.read_text())
    except OSError as exc:
        outcomes.append(type(exc).__name__)
    unix = socket.socket(socket.AF_UNIX)
    try:
        unix.connect(str(layout.local_api_socket))
        outcomes.append("connected")
    except OSError as exc:
        outcomes.append(type(exc).__name__)
    finally:
        unix.close()
    return " ".join(outcomes)


@dataclass
class Served:
    device: Device
    api: LocalApi
    config_path: Path

    @property
    def layout(self) -> StateLayout:
        return self.device.installer.layout

    @property
    def port(self) -> int:
        return self.api.address[1]

    def serving(self) -> str | None:
        current: str | None = status_dict(self.device.installer)["current"]
        return current


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own temporary directories are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="edgefleet-auth-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _serve(open_dir: Path, trust: TrustRoot, bundles: Bundles, *, socket: bool) -> Served:
    config = device_config(open_dir / "device", trust.raw)
    device = Device.boot(config, server=open_dir / "server")
    for release in bundles.releases[:2]:
        device.installer.install_file(release)
    config_path = open_dir / "device" / "agent.toml"
    write_config(config_path, config)
    config_path.chmod(0o644)  # so that `nobody` gets as far as the state directory
    layout = device.installer.layout
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)

    def install(path: Path) -> dict[str, object]:
        device.installer.install_upload(path)
        return status_dict(device.installer)

    api = LocalApi(
        predictor,
        "127.0.0.1",
        0,
        install=install,
        rollback=lambda: (device.installer.rollback(), status_dict(device.installer))[1],
        install_state=lambda: device.installer.status().state.value,
        token=issue_token(layout.local_api_token),
        uploads=layout.downloads,
        max_bundle_bytes=config.limits.max_bundle_bytes,
        listener=listen("127.0.0.1", 0),
        unix_listener=listen_unix(layout.local_api_socket) if socket else None,
    )
    api.start()
    host, port = api.address
    layout.local_api_file.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
    return Served(device, api, config_path)


@pytest.fixture
def served(open_dir: Path, trust: TrustRoot, releases: Bundles) -> Iterator[Served]:
    served = _serve(open_dir, trust, releases, socket=True)
    yield served
    served.api.stop()


def test_without_the_token_nobody_can_neither_roll_back_nor_install(
    served: Served, releases: Bundles
) -> None:
    before = served.serving()
    assert before is not None and "1.1.0" in before
    bundle = releases.releases[2].read_bytes()
    attempts = [
        ("/v1/rollback", "application/json", b"", ""),
        ("/v1/rollback", "application/json", b"", "Bearer guessed"),
        ("/v1/install", "application/octet-stream", bundle, ""),
        ("/v1/install", "application/octet-stream", bundle, "Bearer guessed"),
    ]
    for path, kind, body, authorization in attempts:
        answer = as_nobody(partial(post, served.port, path, kind, body, authorization))
        assert answer == "401", (path, authorization, answer)
    assert served.serving() == before
    assert list(served.layout.downloads.iterdir()) == []  # no body was kept


def test_nobody_can_neither_read_the_token_nor_connect_to_the_socket(served: Served) -> None:
    layout = served.layout
    assert stat.S_IMODE(layout.local_api_token.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.local_api_socket.stat().st_mode) == 0o600
    # nobody gets as far as the state directory: only the agent's modes keep it out.
    assert as_nobody(lambda: str(layout.root.parent.is_dir())) == "True"
    assert as_nobody(lambda: reach(layout)) == "PermissionError PermissionError"
    assert reach(layout).endswith(" connected")  # root does both


def test_nobody_still_predicts(served: Served) -> None:
    features, _ = datasets.digits_tabular()
    body = json.dumps({"inputs": {"features": features[:2].tolist()}}).encode()
    assert as_nobody(lambda: post(served.port, "/v1/predict", "application/json", body)) == "200"


def _cli(*args: str | Path) -> int:
    return run_with_error_handling(agent_group, [*map(str, args)])


def test_the_cli_as_root_installs_and_rolls_back_through_the_socket(
    served: Served, releases: Bundles
) -> None:
    served.layout.local_api_token.unlink()  # on TCP, a change would now be refused
    assert _cli("install", releases.releases[2], "--config", served.config_path) == 0
    assert "1.2.0" in str(served.serving())
    assert _cli("rollback", "--config", served.config_path) == 0
    assert "1.1.0" in str(served.serving())


def test_without_the_socket_the_cli_uses_tcp_and_the_token(
    open_dir: Path, trust: TrustRoot, releases: Bundles
) -> None:
    served = _serve(open_dir, trust, releases, socket=False)
    try:
        assert _cli("rollback", "--config", served.config_path) == 0
        assert "1.0.0" in str(served.serving())
    finally:
        served.api.stop()


def test_the_cli_as_nobody_says_what_to_do(
    served: Served, releases: Bundles, open_dir: Path
) -> None:
    before = served.serving()
    bundle = open_dir / "usb-stick.efb"  # a bundle nobody may read
    shutil.copyfile(releases.releases[2], bundle)
    bundle.chmod(0o644)

    def cli_as_nobody(*args: str) -> str:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status = _cli(*args, "--config", served.config_path)
        return f"{status} {errors.getvalue()}"

    for args in (["install", str(bundle)], ["rollback"]):
        answer = as_nobody(partial(cli_as_nobody, *args))
        assert answer.startswith("2 error [usage]: ") and answer.count("\n") == 1, answer
        assert "run this as root (sudo) or as the agent's user" in answer
    assert served.serving() == before
