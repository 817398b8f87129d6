"""`edgefleet agent init`: the configuration a device starts from; a wrong value in one line."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from edgefleet.agent.cli import agent as agent_group
from edgefleet.agent.config import load_config
from edgefleet.agent.enrolltoken import write_enroll_token
from edgefleet.agent.layout import StateLayout
from edgefleet.cli.errors import run_with_error_handling


def init(tmp_path: Path, trust_file: Path, *extra: str, output: Path | None = None) -> list[str]:
    return [
        "init", "--device-id", "cam-017", "--trust", str(trust_file), "--profile", "x86_64-vnni",
        "--state-dir", str(tmp_path / "state"), "-o", str(output or tmp_path / "agent.toml"),
        *extra,
    ]  # fmt: skip


def test_init_creates_the_configuration_directory(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "etc" / "edgefleet" / "agent.toml"  # a fresh device: no /etc/edgefleet
    old = os.umask(0o077)  # whatever the umask, the service can enter the directories
    try:
        assert run_with_error_handling(agent_group, init(tmp_path, trust_file, output=output)) == 0
    finally:
        os.umask(old)
    assert "wrote" in capsys.readouterr().out
    for directory in (output.parent, output.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    config = load_config(output)
    assert config.device_id == "cam-017" and config.local_api.enabled
    assert config.local_api.port == 8765
    assert sorted(p.name for p in output.parent.iterdir()) == ["agent.toml"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--device-id",
            "cam 017/a",
            "--device-id: 'cam 017/a' is not a device id: 1 to 128 letters, digits",
        ),
        ("--mqtt", "broker:1883", "--mqtt: 'broker:1883' is not mqtt://host[:port] or mqtts://"),
        ("--mqtt", "mqtt://", "--mqtt: 'mqtt://' is not mqtt://host[:port]"),
        (
            "--server",
            "127.0.0.1:8080",
            "--server: '127.0.0.1:8080' is not http://host[:port] or https://host[:port]",
        ),
        ("--server", "ftp://fleet", "--server: 'ftp://fleet' is not http://host[:port]"),
        ("--local-api-port", "70000", "'70000' is not a port (0 to 65535) or none"),
        ("--local-api-port", "off", "'off' is not a port (0 to 65535) or none"),
    ],
)
def test_init_refuses_a_bad_value_in_one_line_naming_the_option(
    tmp_path: Path,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    message: str,
) -> None:
    args = init(tmp_path, trust_file, option, value)
    if option == "--device-id":
        args[args.index("cam-017")] = value
    assert run_with_error_handling(agent_group, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error [usage]: ")
    assert message in err and "pydantic" not in err
    assert list(tmp_path.iterdir()) == [trust_file]  # nothing written


def test_a_token_without_a_server_is_refused(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = init(tmp_path, trust_file, "--enroll-token", "efe_x")
    assert run_with_error_handling(agent_group, args) == 2
    assert capsys.readouterr().err == (
        "error [usage]: --enroll-token needs --server: the token is for that fleet server\n"
    )
    assert list(tmp_path.iterdir()) == [trust_file]


@pytest.mark.parametrize(
    ("value", "enabled", "port"), [("9100", True, 9100), ("0", True, 0), ("none", False, 8765)]
)
def test_init_sets_the_local_api_port(
    tmp_path: Path, trust_file: Path, value: str, enabled: bool, port: int
) -> None:
    args = init(tmp_path, trust_file, "--local-api-port", value)
    assert run_with_error_handling(agent_group, args) == 0
    settings = load_config(tmp_path / "agent.toml").local_api
    assert (settings.enabled, settings.port) == (enabled, port)


def another_group() -> grp.struct_group:
    """A group other than this process's own, that this process may give a file to."""
    gids = {g.gr_gid for g in grp.getgrall()} if os.geteuid() == 0 else set(os.getgroups())
    gids.discard(os.getegid())
    if not gids:
        pytest.skip("this user is in no group but its own")
    return grp.getgrgid(min(gids))


def test_init_lets_the_services_group_read_the_configuration(
    tmp_path: Path, trust_file: Path
) -> None:
    group = another_group()
    args = init(tmp_path, trust_file, "--group", group.gr_name)
    assert run_with_error_handling(agent_group, args) == 0
    written = (tmp_path / "agent.toml").stat()
    assert stat.S_IMODE(written.st_mode) == 0o640 and written.st_gid == group.gr_gid


def test_an_unknown_group_is_refused(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = init(tmp_path, trust_file, "--group", "no-such-group-here")
    assert run_with_error_handling(agent_group, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [usage]: --group no-such-group-here: no such group here")
    assert not (tmp_path / "agent.toml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_the_kept_token_belongs_to_the_state_directorys_owner(tmp_path: Path) -> None:
    # init runs as root; the agent runs as the service's user, which owns the state directory.
    layout = StateLayout(tmp_path / "state")
    layout.root.mkdir()
    os.chown(layout.root, 4321, 4321)
    write_enroll_token(layout, "efe_token")
    kept = layout.enroll_token_file.stat()
    assert (kept.st_uid, kept.st_gid) == (4321, 4321)
    assert stat.S_IMODE(kept.st_mode) == 0o600


@pytest.fixture
def fleet_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The fleet CA's certificate, and a client certificate and key it issued."""
    from edgefleet.fleetca import init_ca

    ca = init_ca(tmp_path / "ca")
    issued, key = ca.issue_key_pair("cam-017")
    cert_file, key_file = tmp_path / "cam-017.crt", tmp_path / "cam-017.key"
    cert_file.write_bytes(issued.pem)
    key_file.write_bytes(key)
    return tmp_path / "ca" / "ca.crt", cert_file, key_file


def test_init_sets_the_fleet_ca_and_the_client_certificate(
    tmp_path: Path, trust_file: Path, fleet_files: tuple[Path, Path, Path]
) -> None:
    ca, cert, key = fleet_files
    extra = ["--server", "https://fleet.example", "--mqtt", "mqtts://broker:8883"]
    extra += ["--ca", str(ca), "--cert", str(cert), "--key", str(key)]
    assert run_with_error_handling(agent_group, init(tmp_path, trust_file, *extra)) == 0
    config = load_config(tmp_path / "agent.toml")
    assert config.server_ca_file == ca.resolve() and config.mqtt.ca_file == ca.resolve()
    assert (config.mqtt.cert_file, config.mqtt.key_file) == (cert.resolve(), key.resolve())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cert without key", "--cert and --key go together"),
        ("not a CA", "not a CA certificate in PEM"),
        ("key of another certificate", "not a PEM certificate and its unencrypted key"),
    ],
)
def test_init_refuses_tls_files_that_do_not_load_naming_them(
    tmp_path: Path,
    trust_file: Path,
    fleet_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    _, cert, key = fleet_files
    if case == "cert without key":
        extra = ["--cert", str(cert)]
    elif case == "not a CA":
        extra = ["--ca", str(key)]
    else:
        extra = ["--cert", str(cert), "--key", str(tmp_path / "ca" / "ca.key")]
    output = tmp_path / "out" / "agent.toml"
    assert (
        run_with_error_handling(agent_group, init(tmp_path, trust_file, *extra, output=output)) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error [usage]: ") and message in err
    assert not output.exists()


def test_init_refuses_a_trust_file_that_is_not_a_trust_root_naming_trust(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "release.pub"
    key.write_text("ed25519 not-a-trust-root\n")
    assert run_with_error_handling(agent_group, init(tmp_path, key)) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error [usage]: --trust {key}: not a trust root (") and err.count("\n") == 1
    )
    assert not (tmp_path / "agent.toml").exists()
