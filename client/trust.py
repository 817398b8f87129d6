"""`edgefleet trust`: hand the fleet server a newer trust root, show the one it holds."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.cli.options import echo_json, json_option
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.options import cell, client_command
from edgefleet.trust import MAX_TRUST_ROOT_BYTES


@click.group()
def trust() -> None:
    """The fleet's trust root on the server: push a newer version, show the newest.

    \b
    The root key holders make version N+1 with `edgefleet keys rotate`; an admin
    pushes it here. The server checks it exactly as a device will (the next
    version, signed by the old and the new root keys, not expired, still listing
    the server's key), stores it, and publishes it to every device.
    """


@trust.command("push")
@click.argument(
    "trust_path",
    metavar="TRUST_JSON",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@json_option
@client_command
def push_command(client: ApiClient, trust_path: Path, as_json: bool) -> None:
    """Hand the server TRUST_JSON, the next version of its trust root (admin token).

    Versions go one at a time, in order: push each version the server lacks.
    A trust root the server refuses is reported with the reason, as a device
    would refuse it (exit status 1).
    """
    with trust_path.open("rb") as file:
        document = file.read(MAX_TRUST_ROOT_BYTES + 1)  # the server says what is too large
    row = client.push_trust_root(document)
    if as_json:
        echo_json(row)
        return
    click.echo(f"pushed: trust root version {row.get('version')}, {_summary(row)}")


@trust.command("show")
@json_option
@client_command
def show_command(client: ApiClient, as_json: bool) -> None:
    """The newest trust root version the server holds, and when it expires."""
    row = client.get_trust_root()
    if as_json:
        echo_json(row)
        return
    click.echo(f"trust root version {row.get('version')}, {_summary(row)}")


def _summary(row: JsonObject) -> str:
    keyids = row.get("server_keyids") or []
    return f"expires {cell(row.get('expires'))}, server keys {cell([k[:12] for k in keyids])}"
