"""`edgefleet samples`: raw inputs devices kept while they flagged drift, and uploaded."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.client.api import ApiClient
from edgefleet.client.options import ROW_ID, client_command, limit_option
from edgefleet.fileio import atomic_write_bytes


@click.group()
def samples() -> None:
    """Raw inputs devices uploaded: list them, download one.

    \b
    A device keeps raw inputs only with `[drift] capture_inputs = true`, while
    its own drift check flags drift, and uploads them only with
    `[drift] upload_inputs = true` (both off by default). The files are .npz,
    one array per input, samples first: data for retraining or calibration.
    """


@samples.command("list")
@click.option("--device", metavar="DEVICE_ID", help="Only this device's uploads.")
@limit_option
@json_option
@client_command
def list_command(client: ApiClient, device: str | None, limit: int, as_json: bool) -> None:
    """Uploads, newest first: which device, model and drift, how many samples."""
    rows = client.list_samples(device=device, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no uploaded samples")
        return
    echo_table(
        ["ID", "DEVICE", "BUNDLE", "SAMPLES", "BYTES", "CAPTURED", "REASON"],
        [
            [
                row.get("id"),
                row.get("device_id"),
                f"{row.get('bundle_name')}@{row.get('bundle_version')}",
                row.get("samples"),
                row.get("size_bytes"),
                row.get("captured_at"),
                row.get("reason"),
            ]
            for row in rows
        ],
    )


@samples.command("get")
@click.argument("sample_id", metavar="ID", type=ROW_ID)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the .npz (replaced atomically).",
)
@client_command
def get_command(client: ApiClient, sample_id: int, output: Path) -> None:
    """Download upload ID as an .npz (operator role; the server audits it: raw inputs
    are sensitive data)."""
    data = client.get_sample_file(sample_id)
    atomic_write_bytes(output, data, mode=0o600)
    click.echo(f"wrote {len(data)} bytes of samples {sample_id} to {output}")
