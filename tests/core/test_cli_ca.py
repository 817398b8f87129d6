"""`edgefleet ca init|issue` and `edgefleet broker config`: the files they write, and what
they refuse. (The configuration in a real mosquitto: tests/server/test_broker_lockdown.py.)"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.brokerconf import acl_text
from edgefleet.mqtt.topics import DEVICES_PREFIX, Direction, TopicKind
from tests.clirun import Cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _common_name(path: Path) -> str:
    return str(_cert(path).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _server_names(path: Path) -> set[str]:
    san = _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in san}


def test_ca_init_writes_a_private_key_says_what_next_and_never_overwrites(
    tmp_path: Path, run: Cli
) -> None:
    out, _ = run("ca", "init", tmp_path / "ca")
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600 and _mode(tmp_path / "ca") == 0o700
    assert "edgefleet broker config --ca" in out
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    _, err = run("ca", "init", tmp_path / "ca", status=2)
    assert "never overwritten" in err
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before


def test_ca_issue_writes_a_server_certificate_and_a_private_key(tmp_path: Path, run: Cli) -> None:
    run("ca", "init", tmp_path / "ca")
    out_dir = tmp_path / "tls"
    run("ca", "issue", "fleet.example", "--ca", tmp_path / "ca", "--server-name",
        "fleet.example", "--server-name", "10.0.0.5", "--no-client", "-o", out_dir)  # fmt: skip
    cert = out_dir / "fleet.example.crt"
    assert _mode(out_dir / "fleet.example.key") == 0o600
    assert _common_name(cert) == "fleet.example"
    assert _server_names(cert) == {"fleet.example", "10.0.0.5"}
    usages = _cert(cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    issuer = _cert(tmp_path / "ca" / "ca.crt")
    _cert(cert).verify_directly_issued_by(issuer)

    before = cert.read_bytes()
    _, err = run("ca", "issue", "fleet.example", "--ca", tmp_path / "ca", "-o", out_dir, status=2)
    assert "never overwritten" in err and cert.read_bytes() == before
    for bad in ("../escape", ".hidden", "a/b", ""):
        _, err = run("ca", "issue", bad, "--ca", tmp_path / "ca", "-o", out_dir, status=2)
        assert "is not valid" in err
    _, err = run("ca", "issue", "x", "--ca", tmp_path / "ca", "--no-client", "-o", out_dir,
                 status=2)  # fmt: skip
    assert "--no-client needs --server-name" in err
    _, err = run("ca", "issue", "x", "--ca", tmp_path / "nowhere", "-o", out_dir, status=2)
    assert "nowhere" in err


def test_broker_config_names_only_files_inside_out(tmp_path: Path, run: Cli) -> None:
    run("ca", "init", tmp_path / "ca")
    out_dir = tmp_path / "broker"
    out, _ = run("broker", "config", "--ca", tmp_path / "ca", "--port", "8883", "-o", out_dir,
                 "--host", "mqtt.example", "--server-identity", "a",
                 "--server-identity", "b")  # fmt: skip
    conf = (out_dir / "mosquitto.conf").read_text()
    settings = [line.split(maxsplit=1) for line in conf.splitlines() if line.strip()]
    files = ("cafile", "certfile", "keyfile", "crlfile", "acl_file", "persistence_location")
    named = [value for key, value in settings if key in files]
    assert len(named) == 6
    for path in map(Path, named):
        assert path.is_absolute() and out_dir.resolve() in (path, path.parent)
        assert path.exists()
    for setting in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "listener 8883",
    ):
        assert setting in conf.splitlines()
    assert _server_names(out_dir / "broker.crt") == {"mqtt.example"}
    for name in ("a", "b"):
        assert _common_name(out_dir / f"server-{name}.crt") == f"server:{name}"
        assert _mode(out_dir / f"server-{name}.key") == 0o600
    assert _mode(out_dir / "broker.key") == 0o600
    crl = x509.load_pem_x509_crl((out_dir / "crl.pem").read_bytes())
    # mosquitto refuses every client once its CRL has expired: this one lasts as the CA.
    assert crl.next_update_utc == _cert(tmp_path / "ca" / "ca.crt").not_valid_after_utc
    assert len(crl) == 0 and crl.is_signature_valid(_cert(tmp_path / "ca" / "ca.crt").public_key())  # type: ignore[arg-type]

    # The server's share group name: a secret, which the output says how to pass.
    share_group = (out_dir / "share-group").read_text()
    assert re.fullmatch(r"edgefleet-[0-9a-f]{32}\n", share_group)
    assert _mode(out_dir / "share-group") == 0o600
    assert f"--share-group-file {out_dir / 'share-group'}" in out

    before = (out_dir / "mosquitto.conf").read_bytes()
    _, err = run("broker", "config", "--ca", tmp_path / "ca", "--port", "9883", "-o", out_dir,
                 status=2)  # fmt: skip
    assert "--force" in err and (out_dir / "mosquitto.conf").read_bytes() == before
    run("broker", "config", "--ca", tmp_path / "ca", "--port", "9883", "-o", out_dir, "--force")
    assert "listener 9883" in (out_dir / "mosquitto.conf").read_text().splitlines()
    assert _server_names(out_dir / "broker.crt") == {"localhost", "127.0.0.1"}
    assert (out_dir / "share-group").read_text() != share_group  # random, never a default
    help_text, _ = run("broker", "config", "--help")
    assert "--share-group-file OUT/share-group" in " ".join(help_text.split())


def test_broker_config_refuses_a_server_identity_that_is_no_plain_name(
    tmp_path: Path, run: Cli
) -> None:
    run("ca", "init", tmp_path / "ca")
    for bad in ("a b", "x/y", "#", "", "a:b"):
        _, err = run("broker", "config", "--ca", tmp_path / "ca", "--port", "8883", "-o",
                     tmp_path / "out", "--server-identity", bad, status=2)  # fmt: skip
        assert "server identity" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_acl_confines_devices_by_direction_and_gives_servers_the_tree() -> None:
    lines = acl_text(["edgefleet"]).splitlines()
    assert "user server:edgefleet" in lines and "topic readwrite edgefleet/v1/#" in lines
    patterns = [line for line in lines if line.startswith("pattern ")]
    for kind in TopicKind:
        access = "write" if kind.direction is Direction.FROM_DEVICE else "read"
        assert f"pattern {access} {DEVICES_PREFIX}/%u/{kind.value}" in patterns
    # Besides its own topics a device may only read the fleet's retained topics.
    others = [line for line in patterns if "%u" not in line]
    assert others == [
        "pattern read edgefleet/v1/fleet/timestamp",
        "pattern read edgefleet/v1/fleet/accepts",
        "pattern read edgefleet/v1/fleet/trust-root/+",
    ]
    assert not [line for line in patterns if "#" in line]
