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
    would refuse it (exit status 1). Stored bundles the new version no longer
    accepts (a release key that signed them is gone) are named in a warning.
    """
    with trust_path.open("rb") as file:
        document = file.read(MAX_TRUST_ROOT_BYTES + 1)  # the server says what is too large
    row = client.push_trust_root(document)
    if as_json:
        echo_json(row)
        return
    click.echo(f"pushed: trust root version {row.get('version')}, {_summary(row)}")
    stranded = row.get("untrusted_bundles") or []
    if stranded:
        click.echo(stranded_warning(row.get("version"), stranded), err=True)


def stranded_warning(version: object, stranded: list[JsonObject]) -> str:
    """The warning for stored bundles a pushed trust root no longer accepts."""
    names = ", ".join(str(item.get("bundle")) for item in stranded[:10])
    more = f" and {len(stranded) - 10} more" if len(stranded) > 10 else ""
    return (
        f"warning: trust root version {version} no longer accepts {len(stranded)} stored "
        f"bundle(s): {names}{more} ({stranded[0].get('reason')}); devices will refuse them "
        "and `rollout start` refuses them: sign the models again with a listed release key "
        "and push them as new versions, or push a trust root that lists the key again"
    )


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
