"""`edgefleet broker config`: a locked-down mosquitto configuration, with its certificates;
`edgefleet broker check`: whether a broker holds what edgefleet relies on."""

from __future__ import annotations

import getpass
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import click

from edgefleet.brokerconf import (
    ACL_FILE,
    CA_FILE,
    CERT_FILE,
    CONF_FILE,
    CRL_FILE,
    DEFAULT_SERVER_IDENTITY,
    KEY_FILE,
    SHARE_GROUP_FILE,
    acl_text,
    mosquitto_conf,
    new_share_group,
    server_identity,
    server_identity_files,
)
from edgefleet.cli.errors import MissingExtraError
from edgefleet.errors import UsageError
from edgefleet.extras import install_hint
from edgefleet.fileio import atomic_write_bytes


@click.group()
def broker() -> None:
    """The fleet's MQTT broker: a locked-down mosquitto configuration; check any broker."""


@broker.command("config")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The fleet CA directory (edgefleet ca init).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), required=True, help="The TLS listener's port."
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for mosquitto.conf and every file it names.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="A DNS name or IP address devices reach the broker by (repeatable) "
    "[default: localhost and 127.0.0.1].",
)
@click.option(
    "--server-identity",
    "server_names",
    multiple=True,
    metavar="NAME",
    help="A server replica's broker identity, CN server:NAME (repeatable; one per "
    f"replica) [default: {DEFAULT_SERVER_IDENTITY}].",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT/mosquitto.conf and its files.")
def config_command(
    ca_dir: Path,
    port: int,
    out_dir: Path,
    hosts: Sequence[str],
    server_names: Sequence[str],
    force: bool,
) -> None:
    """Write OUT/mosquitto.conf for `mosquitto -c OUT/mosquitto.conf`, and what it names.

    \b
    OUT/ca.crt, broker.crt, broker.key   TLS: the fleet CA, the broker's certificate
    OUT/crl.pem                          revoked certificates (none yet)
    OUT/acl                              who may read and write which topics
    OUT/server-NAME.crt, .key            each server replica's identity (CN server:NAME)
    OUT/share-group                      the server's secret share group name (0600)

    Devices connect with the client certificate they got at enrollment; a server
    replica with `edgefleet server run --mqtt mqtts://HOST:PORT --mqtt-ca
    OUT/ca.crt --mqtt-cert OUT/server-NAME.crt --mqtt-key OUT/server-NAME.key
    --share-group-file OUT/share-group` (every replica the same file: a device
    that knew the name could divert the server's messages).
    """
    from edgefleet.fleetca import load_ca, write_private_pem

    names = list(dict.fromkeys(server_names or [DEFAULT_SERVER_IDENTITY]))
    identities = [server_identity(name) for name in names]  # checks each name first
    if (out_dir / CONF_FILE).exists() and not force:
        raise UsageError(
            f"{out_dir / CONF_FILE} already exists: pass --force to replace it and its "
            "certificates, or choose another -o"
        )
    fleet_ca = load_ca(ca_dir)
    broker_cert, broker_key = fleet_ca.issue_key_pair(
        "edgefleet broker", server_names=hosts or ("localhost", "127.0.0.1"), client=False
    )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / CA_FILE, fleet_ca.certificate_pem, mode=0o644)
    atomic_write_bytes(out_dir / CERT_FILE, broker_cert.pem, mode=0o644)
    write_private_pem(out_dir / KEY_FILE, broker_key)
    atomic_write_bytes(out_dir / CRL_FILE, fleet_ca.revocation_list([]), mode=0o644)
    for name, identity in zip(names, identities, strict=True):
        cert, key = fleet_ca.issue_key_pair(identity)
        cert_file, key_file = server_identity_files(name)
        atomic_write_bytes(out_dir / cert_file, cert.pem, mode=0o644)
        write_private_pem(out_dir / key_file, key)
        click.echo(f"wrote {out_dir / cert_file} and {key_file} (identity {identity})")
    share_group_file = out_dir / SHARE_GROUP_FILE
    atomic_write_bytes(share_group_file, f"{new_share_group()}\n".encode(), mode=0o600)
    click.echo(
        f"wrote {share_group_file}: pass it to every replica as "
        f"`edgefleet server run --share-group-file {share_group_file}`; keep it secret"
    )
    atomic_write_bytes(out_dir / ACL_FILE, acl_text(names).encode(), mode=0o644)
    # Last: a configuration exists only once everything it names does.
    atomic_write_bytes(
        out_dir / CONF_FILE, mosquitto_conf(out_dir, port, getpass.getuser()).encode(), mode=0o644
    )
    click.echo(f"wrote {out_dir / CONF_FILE}: run mosquitto -c {(out_dir / CONF_FILE).resolve()}")


@broker.command("check")
@click.argument("url")
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="For mqtts://: the CA the broker's certificate is checked against [default: the "
    "system's].",
)
@click.option(
    "--cert",
    "cert_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="For mqtts://: a client certificate (repeatable, each with its --key). On the "
    "locked-down broker pass server identities (OUT/server-NAME.crt): a device's may use "
    "only its own topics; and pass two, since that broker names each connection after "
    "its certificate and a second connection with the same one closes the first.",
)
@click.option(
    "--key",
    "key_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The key of each --cert, in the same order.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.5),
    default=10.0,
    show_default=True,
    help="Seconds to wait for each answer of the broker.",
)
def check_command(
    url: str,
    ca_file: Path | None,
    cert_files: Sequence[Path],
    key_files: Sequence[Path],
    timeout: float,
) -> None:
    """Check that the MQTT broker at URL (mqtt:// or mqtts://) holds what edgefleet relies on.

    \b
    mqtt5                 an MQTT 5 connection
    queued-qos1           QoS 1 messages queued for an offline persistent session
    shared-subscriptions  one share group per message kind, spread over members
    last-will             the Will of a connection dropped without DISCONNECT
    retained              retained messages, and clearing them
    session-expiry        a session kept within its expiry interval, gone after it
    payload-sizes         the largest block message and the largest device message

    Prints one PASS or FAIL line per check. Topics are under
    edgefleet/v1/broker-check/RUN/, which no server or device uses, so a production
    broker may be checked. Exit status 0 when every check holds, 1 when one fails,
    2 when the broker cannot be reached.
    """
    from edgefleet.brokercheck import BrokerCheckError, CheckTarget, Identity, run_checks

    if len(cert_files) != len(key_files):
        raise UsageError(
            f"{len(cert_files)} --cert and {len(key_files)} --key: pass one --key after each --cert"
        )
    if importlib.util.find_spec("paho") is None:
        raise MissingExtraError(
            "`broker check` needs paho-mqtt, which the agent and the server have: "
            + install_hint("agent")
        )
    identities = [Identity(cert, key) for cert, key in zip(cert_files, key_files, strict=True)]
    target = CheckTarget(url, ca_file, identities, timeout)
    results = run_checks(target, lambda result: click.echo(result.line))
    failed = [result.name for result in results if not result.passed]
    if failed:
        raise BrokerCheckError(
            f"{len(failed)} of {len(results)} checks failed ({', '.join(failed)}): this broker "
            "lacks what edgefleet relies on, see the FAIL lines"
        )
