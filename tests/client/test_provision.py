"""`edgefleet devices provision`: the root-filesystem overlay for one device or a golden
image, against a real fleet server (uvicorn, SQLite) whose tokens the devices then use."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from edgefleet.agent.config import load_config, settle_device_id
from edgefleet.agent.enrolltoken import read_enroll_token
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import AgentConfig
from edgefleet.fleetca import init_ca
from edgefleet.mqtt.topics import is_valid_device_id
from edgefleet.profiles import all_profiles
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, EnrollToken
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot, load_trust_root
from tests.agent.test_systemd_unit import systemd_tool
from tests.clirun import Cli
from tests.conftest import PROFILE
from tests.server.apiclient import Api, make_api, serve
from tests.server.conftest import sqlite_database

__all__ = ["sqlite_database"]  # a fixture used here

SHIPPED = importlib.resources.files("edgefleet.hardware") / "systemd"


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(sqlite_database, tmp_path / "server", trust, open_enrollment=False)


@pytest.fixture
def server_url(api: Api) -> Iterator[str]:
    with serve(api) as url:
        yield url


@pytest.fixture
def ca_cert(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca" / "ca.crt"


@pytest.fixture
def provision(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def provision_args(
    api: Api, server_url: str, trust_file: Path, ca_cert: Path, output: Path, *args: str
) -> list[str | Path]:
    return [
        "devices", "provision", *args, "--profile", PROFILE, "--trust", trust_file,
        "--ca-cert", ca_cert, "--mqtt", "mqtts://broker.example:8883", "-o", output,
        "--server", server_url, "--token", api.tokens[Role.OPERATOR],
    ]  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def remapped(output: Path) -> dict[str, str]:
    """The EDGEFLEET_* overrides that put agent.toml's root-filesystem paths under `output`."""
    return {
        "EDGEFLEET_STATE_DIR": str(output / "var/lib/edgefleet"),
        "EDGEFLEET_TRUST_ROOT": str(output / "etc/edgefleet/trust.json"),
        "EDGEFLEET_SERVER_CA_FILE": str(output / "etc/edgefleet/ca.crt"),
        "EDGEFLEET_MQTT_CA_FILE": str(output / "etc/edgefleet/ca.crt"),
    }


def test_one_device_gets_the_overlay_with_its_modes_and_a_one_use_token(
    provision: Cli,
    api: Api,
    server_url: str,
    trust_file: Path,
    ca_cert: Path,
    tmp_path: Path,
    trust: TrustRoot,
) -> None:
    output = tmp_path / "cam-017"
    args = provision_args(api, server_url, trust_file, ca_cert, output, "cam-017")
    out, _ = provision(*args, "--tag", "site=lab")
    assert f"wrote {output}: device cam-017" in out
    etc = output / "etc/edgefleet"
    units = output / "etc/systemd/system"
    state_dir = output / "var/lib/edgefleet"
    assert {
        str(path.relative_to(output)): mode(path)
        for path in output.rglob("*")
        if not path.is_dir() or path == state_dir
    } == {
        "etc/edgefleet/agent.toml": 0o640,
        "etc/edgefleet/trust.json": 0o644,
        "etc/edgefleet/ca.crt": 0o644,
        "etc/systemd/system/edgefleet-agent.service": 0o644,
        "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service": 0o777,  # a link
        "usr/lib/sysusers.d/edgefleet.conf": 0o644,
        "usr/lib/tmpfiles.d/edgefleet.conf": 0o644,
        "var/lib/edgefleet": 0o700,
        "var/lib/edgefleet/enroll-token": 0o600,
    }
    # cp -a copies the directories' modes too, the overlay's own onto the image's root.
    directory_modes = {mode(path) for path in [output, *output.rglob("*")] if path.is_dir()}
    assert directory_modes == {0o755, 0o700}  # 0700: var/lib/edgefleet alone, checked above
    link = units / "multi-user.target.wants/edgefleet-agent.service"
    assert link.readlink() == Path("../edgefleet-agent.service")
    assert link.resolve() == units / "edgefleet-agent.service"
    assert (units / "edgefleet-agent.service").read_bytes() == (
        SHIPPED / "edgefleet-agent.service"
    ).read_bytes()
    assert (output / "usr/lib/sysusers.d/edgefleet.conf").read_bytes() == (
        SHIPPED / "edgefleet-sysusers.conf"
    ).read_bytes()
    assert (etc / "trust.json").read_bytes() == trust.raw
    assert (etc / "ca.crt").read_bytes() == ca_cert.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cam-017")]  # no staging

    config = load_config(etc / "agent.toml")  # as the device reads it
    assert (config.device_id, config.profile, config.server_url) == ("cam-017", PROFILE, server_url)
    assert config.state_dir == Path("/var/lib/edgefleet")
    assert config.trust_root == Path("/etc/edgefleet/trust.json")
    assert config.server_ca_file == config.mqtt.ca_file == Path("/etc/edgefleet/ca.crt")
    assert config.mqtt.url == "mqtts://broker.example:8883"

    token = read_enroll_token(StateLayout(state_dir))
    assert token is not None
    enrolled = api.enroll("cam-017", enroll_token=token)
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["tags"] == {"site": "lab"}
    assert api.enroll("cam-018", enroll_token=token).status_code == 403  # one use


def test_agent_toml_from_the_overlay_loads_with_its_paths_under_the_directory(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    output = tmp_path / "image"
    provision(*provision_args(api, server_url, trust_file, ca_cert, output, "cam-1"))
    config = load_config(output / "etc/edgefleet/agent.toml", remapped(output))
    assert load_trust_root(config.trust_root).version == 1
    assert config.server_ca_file is not None and config.server_ca_file.read_bytes().startswith(
        b"-----BEGIN CERTIFICATE-----"
    )
    assert read_enroll_token(StateLayout(config.state_dir)) is not None


def test_first_boot_gives_agent_toml_to_the_service_group(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    """systemd-sysusers, then systemd-tmpfiles, as at boot, on the overlay as a root."""
    sysusers, tmpfiles = systemd_tool("systemd-sysusers"), systemd_tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another group")
    root = tmp_path / "root"
    provision(*provision_args(api, server_url, trust_file, ca_cert, root, "cam-1"))
    for tool, conf in ((sysusers, "sysusers.d"), (tmpfiles, "tmpfiles.d")):
        command = [tool, f"--root={root}", str(root / "usr/lib" / conf / "edgefleet.conf")]
        if tool == tmpfiles:
            command.insert(1, "--create")
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    groups = {line.split(":")[0]: int(line.split(":")[2]) for line in (root / "etc/group").open()}
    config = (root / "etc/edgefleet/agent.toml").stat()
    assert (config.st_uid, config.st_gid) == (0, groups["edgefleet"])
    assert stat.S_IMODE(config.st_mode) == 0o640


def enroll_from_image(api: Api, image: Path, state_dir: Path) -> tuple[str, int]:
    """A device booted from `image` (its own state directory): its id and enrollment status."""
    environ = {**remapped(image), "EDGEFLEET_STATE_DIR": str(state_dir)}
    config = settle_device_id(load_config(image / "etc/edgefleet/agent.toml", environ), make=True)
    token = (image / "var/lib/edgefleet/enroll-token").read_text().strip()
    return config.device_id, api.enroll(config.device_id, enroll_token=token).status_code


def test_a_golden_image_enrolls_its_count_of_devices_and_refuses_one_more(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    image = tmp_path / "golden"
    args = provision_args(api, server_url, trust_file, ca_cert, image, "--claim", "--uses", "3")
    out, _ = provision(*args, "--expires", "30d", "--id-prefix", "cam", "--tag", "image=pi-v3")
    assert "a golden image for 3 devices" in out
    config = load_config(image / "etc/edgefleet/agent.toml")
    assert (config.device_id, config.device_id_prefix) == ("auto", "cam")
    results = [enroll_from_image(api, image, tmp_path / f"sd-{n}") for n in range(4)]
    assert [status for _, status in results] == [201, 201, 201, 403]
    ids = [device_id for device_id, _ in results]
    assert len(set(ids)) == 4 and all(re.fullmatch(r"cam-[0-9a-f]{12}", i) for i in ids)
    listed = api.get("/devices", params={"tag": "image=pi-v3"}).json()
    assert sorted(row["id"] for row in listed["items"]) == sorted(ids[:3])


def test_a_golden_image_is_useless_once_its_claim_expired(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    image = tmp_path / "golden"
    provision(
        *provision_args(api, server_url, trust_file, ca_cert, image, "--claim", "--uses", "3"),
        "--expires",
        "1h",
    )
    api.clock.advance(3601)
    assert enroll_from_image(api, image, tmp_path / "sd")[1] == 403


def test_a_directory_that_is_not_empty_is_refused_and_kept_unless_forced(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = provision_args(api, server_url, trust_file, ca_cert, output, "cam-1")
    _, err = provision(*args, status=2)
    assert err.startswith("error [") and "not empty: pass --force" in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    provision(*args, "--force")
    assert not (output / "notes.txt").exists()
    assert (output / "etc/edgefleet/agent.toml").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_bad_input_writes_nothing(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    forged = tmp_path / "forged.json"
    forged.write_text('{"signed": {}, "signatures": []}')
    images = tmp_path / "images"
    images.mkdir()
    output = images / "out"
    _, err = provision(*provision_args(api, server_url, forged, ca_cert, output, "cam-1"), status=1)
    assert err.startswith("refused [")
    _, err = provision(
        *provision_args(api, server_url, trust_file, forged, output, "cam-1"), status=2
    )
    assert "--ca-cert" in err
    assert list(images.iterdir()) == []  # neither the directory nor a staging one
    with api.context.db.session() as session:  # and no token was created
        assert session.scalar(select(func.count()).select_from(EnrollToken)) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cam-1", "--claim", "--uses", "3"], "not both"),
        ([], "not both"),
        (["--claim"], "--claim needs --uses"),
        (["cam-1", "--uses", "3"], "go with --claim"),
        (["auto"], "use --claim"),
        (["bad/id"], "DEVICE_ID: 'bad/id' is not a device id"),
    ],
)
def test_usage_errors_are_one_line(
    provision: Cli,
    api: Api,
    server_url: str,
    trust_file: Path,
    ca_cert: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    _, err = provision(
        *provision_args(api, server_url, trust_file, ca_cert, tmp_path / "out", *args), status=2
    )
    assert err.count("\n") == 1 and message in err


def enrolled_row(device_id: str) -> dict[str, object]:
    return {
        "id": device_id,
        "public_key": "00" * 32,
        "enrolled_at": dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
        "profile": PROFILE,
        "arch": "x86_64",
        "runtimes": ["onnxruntime"],
        "agent_version": "0.2.0",
        "tags": {},
        "online": False,
        "health": "unknown",
        "status_sequence": 0,
        "directive_sequence": 0,
    }


def test_the_help_names_a_real_profile_and_host_is_refused(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    out, _ = provision("devices", "provision", "--help")
    named = re.findall(r"--profile ([a-z][\w.-]+)", out)  # examples, not the TEXT metavar
    assert named and all(name in all_profiles() for name in named), named
    args = provision_args(api, server_url, trust_file, ca_cert, tmp_path / "out", "cam-1")
    args[args.index("--profile") + 1] = "host"
    _, err = provision(*args, status=2)
    assert err.startswith("error [usage]: --profile host would be this machine's profile")
    assert "`edgefleet targets list`" in err
    assert not (tmp_path / "out").exists()
    with api.context.db.session() as session:
        assert session.scalar(select(func.count()).select_from(EnrollToken)) == 0


def test_an_enrolled_id_is_refused_before_anything_is_written(
    provision: Cli, api: Api, server_url: str, trust_file: Path, ca_cert: Path, tmp_path: Path
) -> None:
    with api.context.db.session() as session:  # enrolled as enrollment stores it
        session.add(Device(**enrolled_row("cam-01")))
    output = tmp_path / "cam-01"
    _, err = provision(
        *provision_args(api, server_url, trust_file, ca_cert, output, "cam-01"), status=1
    )
    assert err.startswith("refused [already-enrolled]: device 'cam-01' is enrolled already")
    assert "`edgefleet devices remove cam-01`" in err and "choose another id" in err
    assert not output.exists()
    with api.context.db.session() as session:
        assert session.scalar(select(func.count()).select_from(EnrollToken)) == 0
    # another id goes through
    provision(*provision_args(api, server_url, trust_file, ca_cert, output, "cam-02"))
    assert (output / "var/lib/edgefleet/enroll-token").exists()


def test_the_first_boot_device_id_is_made_once_and_kept(tmp_path: Path, trust_file: Path) -> None:
    config = AgentConfig(
        device_id="auto",
        device_id_prefix="line3",
        profile=PROFILE,
        state_dir=tmp_path / "state",
        trust_root=trust_file,
    )
    with pytest.raises(ConfigError, match="no id was made yet"):
        settle_device_id(config, make=False)  # `agent status` before the first start
    first = settle_device_id(config, make=True).device_id
    assert is_valid_device_id(first) and re.fullmatch(r"line3-[0-9a-f]{12}", first)
    for make in (True, False):  # restarts, and commands that only read it
        assert settle_device_id(config, make=make).device_id == first
    assert (tmp_path / "state/device-id").read_text() == first + "\n"
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["device-id"]  # no leftovers
    named = config.model_copy(update={"device_id": "cam-9"})
    assert settle_device_id(named, make=True) is named  # a configured id stays as it is
    (tmp_path / "state/device-id").write_text("../etc\n")
    with pytest.raises(ConfigError, match="not a device id"):
        settle_device_id(config, make=True)


def test_device_is_another_name_for_devices(
    provision: Cli,
    api: Api,
    server_url: str,
    trust_file: Path,
    ca_cert: Path,
    tmp_path: Path,
) -> None:
    args = provision_args(api, server_url, trust_file, ca_cert, tmp_path / "out", "cam-1")
    out, _ = provision("device", *args[1:])
    assert "device cam-1" in out
    assert (tmp_path / "out/etc/edgefleet/agent.toml").exists()
    help_text, _ = provision("--help")
    assert re.search(r"^\s+devices\s", help_text, re.M)
    assert not re.search(r"^\s+device\s", help_text, re.M)  # not listed twice
