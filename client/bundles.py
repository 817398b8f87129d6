"""`edgefleet bundles`: push signed bundles to the fleet server, list and show them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from edgefleet.cli.options import ProgressBar, echo_json, echo_table, human_bytes, json_option
from edgefleet.client.accuracy import echo_accuracy
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.options import cell, client_command, parse_bundle_ref
from edgefleet.wire import NotFoundError


@click.group()
def bundles() -> None:
    """Bundles on the fleet server: push, list, show.

    \b
    A bundle is pushed once and then rolled out (`edgefleet rollout start`).
    The server checks its release signature against the server's trust root
    before storing it; a bundle is identified by NAME@VERSION.
    """


@bundles.command("push")
@click.argument(
    "bundle_path",
    metavar="BUNDLE_FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@json_option
@client_command
def push_command(client: ApiClient, bundle_path: Path, as_json: bool) -> None:
    """Upload BUNDLE_FILE (an .efb from `edgefleet bundle build`) to the server.

    The file is streamed, with a progress bar on a terminal. Pushing the same
    file again is harmless; a different file under the same NAME@VERSION is
    refused (bump the version instead). A bundle the server's trust root does
    not accept is refused with the reason, as `edgefleet bundle verify` would.
    """
    length = bundle_path.stat().st_size
    with ProgressBar(length, f"pushing {bundle_path.name}") as bar:
        row, created = client.push_bundle(bundle_path, bar.advance)
    if as_json:
        echo_json({**row, "created": created})
        return
    what = "pushed" if created else "already stored (identical file)"
    size = human_bytes(int(row.get("length", 0)))
    click.echo(
        f"{what}: {row.get('name')}@{row.get('version')}, {size}, "
        f"sha256 {row.get('sha256')}, profiles {cell(row.get('profiles'))}"
    )


@bundles.command("list")
@click.option("--name", help="Only the versions of this model.")
@json_option
@client_command
def list_command(client: ApiClient, name: str | None, as_json: bool) -> None:
    """The bundles on the server, newest first."""
    rows = client.list_bundles(name)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no bundles" + (f" named {name}" if name else "") + ": `edgefleet bundles push`")
        return
    echo_table(
        ["BUNDLE", "SIZE", "PROFILES", "RELEASE", "PUSHED", "BY", "SHA256"],
        [
            [
                f"{row.get('name')}@{row.get('version')}",
                human_bytes(int(row.get("length", 0))),
                cell(row.get("profiles")),
                cell(row.get("release_counter")),
                cell(row.get("pushed_at")),
                cell(row.get("pushed_by")),
                str(row.get("sha256", ""))[:12],
            ]
            for row in rows
        ],
    )


@bundles.command("show")
@click.argument("ref", metavar="NAME@VERSION")
@json_option
@client_command
def show_command(client: ApiClient, ref: str, as_json: bool) -> None:
    """One bundle: digest, profiles, files and lineage from its signed manifest."""
    name, version = parse_bundle_ref(ref)
    row = client.get_bundle(name, version)
    if as_json:
        echo_json(row)
        return
    _echo_bundle(row)
    with contextlib.suppress(NotFoundError):  # a server that predates GET /accuracy
        echo_accuracy(client.get_accuracy(name, version))


def _echo_bundle(row: JsonObject) -> None:
    manifest: dict[str, Any] = row.get("manifest") or {}
    click.echo(f"bundle:            {row.get('name')}@{row.get('version')}")
    click.echo(f"sha256:            {row.get('sha256')}")
    click.echo(f"size:              {human_bytes(int(row.get('length', 0)))}")
    click.echo(f"profiles:          {cell(row.get('profiles'))}")
    click.echo(f"release counter:   {cell(row.get('release_counter'))}")
    click.echo(f"min agent version: {cell(row.get('min_agent_version'))}")
    click.echo(f"created:           {cell(manifest.get('created'))}")
    click.echo(f"pushed:            {cell(row.get('pushed_at'))} by {cell(row.get('pushed_by'))}")
    lineage = manifest.get("lineage") or {}
    if isinstance(lineage, dict):
        for key, value in sorted(lineage.items()):
            click.echo(f"lineage {key}: {value}")
    files = manifest.get("files") or []
    if files:
        click.echo("")
        echo_table(
            ["FILE", "SIZE", "SHA256"],
            [
                [f.get("path"), human_bytes(int(f.get("length", 0))), str(f.get("sha256"))[:16]]
                for f in files
            ],
        )
