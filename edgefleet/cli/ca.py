"""`edgefleet ca`: the fleet CA (X.509, for TLS to the broker and the server), certificates."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import click

from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_write_bytes

# A certificate name that is also a file name: no '/', no leading dot.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@click.group()
def ca() -> None:
    """The fleet CA: client certificates for devices and servers, server certificates.

    \b
      edgefleet ca init fleet-ca/
      edgefleet ca issue fleet.example.com --ca fleet-ca/ \\
          --server-name fleet.example.com -o tls/
    """


@ca.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init_command(directory: Path) -> None:
    """Create a CA in DIRECTORY: ca.crt (public) and ca.key (0600). Never overwrites one."""
    from edgefleet.fleetca import CA_CERT_FILE, CA_KEY_FILE, init_ca

    init_ca(directory)
    click.echo(f"wrote {directory / CA_CERT_FILE} (give it to the broker and every device)")
    click.echo(f"wrote {directory / CA_KEY_FILE} (mode 0600: whoever holds it issues identities)")
    click.echo(
        f"next: edgefleet broker config --ca {directory} --port 8883 -o broker/, and "
        f"edgefleet server run --ca {directory} so enrolling devices get certificates"
    )


@ca.command("issue")
@click.argument("name")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The CA directory (edgefleet ca init).",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    metavar="HOST",
    help="A DNS name or IP address the certificate serves (repeatable): makes it a "
    "server certificate, for HTTPS or a broker.",
)
@click.option(
    "--client/--no-client",
    default=True,
    show_default=True,
    help="Also a TLS client certificate (its NAME is then the broker user name).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for NAME.crt and NAME.key (0600).",
)
def issue_command(
    name: str, ca_dir: Path, server_names: Sequence[str], client: bool, out_dir: Path
) -> None:
    """Issue a certificate named NAME and its new key: OUT/NAME.crt, OUT/NAME.key."""
    from edgefleet.fleetca import load_ca, write_private_pem

    if not _NAME.fullmatch(name):
        raise UsageError(
            f"certificate name {name!r} is not valid: 1-64 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    if not server_names and not client:
        raise UsageError("--no-client needs --server-name: the certificate would serve nothing")
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    existing = [str(path) for path in (cert_path, key_path) if path.exists()]
    if existing:
        raise UsageError(
            f"{', '.join(existing)} already exist: never overwritten; choose another -o"
        )
    issued, key_pem = load_ca(ca_dir).issue_key_pair(name, server_names=server_names, client=client)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private_pem(key_path, key_pem)
    atomic_write_bytes(cert_path, issued.pem, mode=0o644)
    click.echo(
        f"wrote {cert_path} (serial {issued.serial}, valid until {issued.not_after:%Y-%m-%d})"
    )
    click.echo(f"wrote {key_path} (mode 0600)")
